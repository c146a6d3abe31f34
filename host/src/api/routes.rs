//! Every route airlockd serves, in one table: method, path, which
//! listener serves it, its handler, and what the OpenAPI document says of
//! it. Both routers are built from this table ([`super::operator_router`],
//! [`super::viewer_router`]) and [`super::openapi`] describes the same
//! rows, so the document cannot list a route that is not served, nor miss
//! one that is.

use axum::routing::{on, MethodFilter, MethodRouter};

use super::{auth, pages, vms, webrtc, AppState};

/// Which listener serves a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The operator API only.
    Operator,
    /// The viewers' listener only.
    Viewer,
    /// Both.
    Both,
}

impl Surface {
    /// True when a route of this surface is served on `listener`.
    pub fn serves(self, listener: Listener) -> bool {
        matches!(
            (self, listener),
            (Self::Both, _)
                | (Self::Operator, Listener::Operator)
                | (Self::Viewer, Listener::Viewer)
        )
    }
}

/// A kind of listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The operator API (socket or TCP).
    Operator,
    /// The viewers' listener.
    Viewer,
}

/// What opens a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The operator's socket, or an operator token on TCP.
    Operator,
    /// The session's viewer token (`?token=` or `Authorization: Bearer`).
    ViewerToken,
    /// Nothing: a static page or asset.
    Public,
}

/// An HTTP method of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// GET (and HEAD).
    Get,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// DELETE.
    Delete,
}

impl Method {
    /// Lower case, as OpenAPI names operations.
    pub fn name(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Post => "post",
            Self::Put => "put",
            Self::Delete => "delete",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Self::Get => MethodFilter::GET,
            Self::Post => MethodFilter::POST,
            Self::Put => MethodFilter::PUT,
            Self::Delete => MethodFilter::DELETE,
        }
    }
}

/// A query parameter.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    /// Its name.
    pub name: &'static str,
    /// Whether it must be given.
    pub required: bool,
    /// What it means.
    pub about: &'static str,
}

const fn q(name: &'static str, required: bool, about: &'static str) -> Param {
    Param {
        name,
        required,
        about,
    }
}

/// One route.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// Its method.
    pub method: Method,
    /// Its path (`{id}` for a parameter: axum's syntax is OpenAPI's).
    pub path: &'static str,
    /// Which listener serves it.
    pub surface: Surface,
    /// What opens it.
    pub access: Access,
    /// The handler.
    pub handler: Handler,
    /// One line on what it does.
    pub summary: &'static str,
    /// Its query parameters.
    pub query: &'static [Param],
    /// The request body's schema (in the document's components), if any.
    pub body: Option<&'static str>,
    /// Answers: status, description, schema (none: no JSON body).
    pub answers: &'static [(u16, &'static str, Option<&'static str>)],
}

/// Every handler a route may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Handler {
    Health,
    Metrics,
    OpenApi,
    VmCreate,
    VmList,
    VmGet,
    VmDelete,
    VmExec,
    VmFileGet,
    VmFilePut,
    VmStatus,
    SessionStart,
    Providers,
    SessionGet,
    SessionEvents,
    ViewerEvents,
    SessionCancel,
    SessionInput,
    Screenshot,
    ViewerToken,
    IceServers,
    Socket,
    Offer,
    Answer,
    NewSessionPage,
    ViewerPage,
    Asset,
}

/// The route's method router.
pub fn endpoint(r: &Route) -> MethodRouter<AppState> {
    let m = r.method.filter();
    match r.handler {
        Handler::Health => on(m, super::health),
        Handler::Metrics => on(m, super::metrics),
        Handler::OpenApi => on(m, super::openapi::serve),
        Handler::VmCreate => on(m, vms::create),
        Handler::VmList => on(m, vms::list),
        Handler::VmGet => on(m, vms::get),
        Handler::VmDelete => on(m, vms::delete),
        Handler::VmExec => on(m, vms::exec),
        Handler::VmFileGet => on(m, vms::get_file),
        Handler::VmFilePut => on(m, vms::put_file),
        Handler::VmStatus => on(m, vms::status),
        Handler::SessionStart => on(m, auth::start),
        Handler::Providers => on(m, auth::providers),
        Handler::SessionGet => on(m, auth::get),
        Handler::SessionEvents => on(m, auth::events),
        Handler::ViewerEvents => on(m, auth::viewer_events),
        Handler::SessionCancel => on(m, auth::cancel),
        Handler::SessionInput => on(m, auth::input),
        Handler::Screenshot => on(m, auth::screenshot),
        Handler::ViewerToken => on(m, auth::viewer_token),
        Handler::IceServers => on(m, webrtc::ice_servers),
        Handler::Socket => on(m, webrtc::ws),
        Handler::Offer => on(m, webrtc::offer),
        Handler::Answer => on(m, webrtc::answer),
        Handler::NewSessionPage => on(m, pages::new_session),
        Handler::ViewerPage => on(m, pages::viewer),
        Handler::Asset => on(m, pages::asset),
    }
}

const ERR: Option<&str> = Some("Error");
const NOT_FOUND_VM: (u16, &str, Option<&str>) = (404, "No VM with this id", ERR);
const NOT_FOUND_SESSION: (u16, &str, Option<&str>) = (404, "No session with this id", ERR);
const REFUSED_TOKEN: &[(u16, &str, Option<&str>)] = &[
    (401, "No viewer token, or an expired one", ERR),
    (403, "A wrong token, or another session's", ERR),
];
const TOKEN: Param = q(
    "token",
    false,
    "The session's viewer token (or `Authorization: Bearer`)",
);

use Access::{Operator as Op, Public, ViewerToken as Vt};
use Method::{Delete, Get, Post, Put};
use Surface::{Both, Operator, Viewer};

/// The table.
#[rustfmt::skip]
pub const ROUTES: &[Route] = &[
    Route { method: Get, path: "/health", surface: Operator, access: Op, handler: Handler::Health,
        summary: "The daemon's state: version, uptime, VM count, backend and acceleration, snapshots",
        query: &[], body: None, answers: &[(200, "Healthy", Some("Health"))] },
    Route { method: Get, path: "/metrics", surface: Operator, access: Op, handler: Handler::Metrics,
        summary: "Prometheus text: VMs and sessions by state, viewers, readiness and login-stage histograms, egress, streamer restarts, store errors",
        query: &[], body: None, answers: &[(200, "Prometheus text format 0.0.4", None)] },
    Route { method: Get, path: "/openapi.json", surface: Both, access: Public, handler: Handler::OpenApi,
        summary: "This document (the listener's own routes)",
        query: &[], body: None, answers: &[(200, "OpenAPI 3.0 document", None)] },
    Route { method: Post, path: "/api/vms", surface: Operator, access: Op, handler: Handler::VmCreate,
        summary: "Create a VM; it answers at once, booting",
        query: &[], body: Some("CreateVm"),
        answers: &[(201, "The VM, booting", Some("Vm")), (400, "A size out of range", ERR), (503, "Its image is missing or stale, or the VM cap is reached", ERR)] },
    Route { method: Get, path: "/api/vms", surface: Operator, access: Op, handler: Handler::VmList,
        summary: "Every VM", query: &[], body: None, answers: &[(200, "The VMs", Some("VmList"))] },
    Route { method: Get, path: "/api/vms/{id}", surface: Operator, access: Op, handler: Handler::VmGet,
        summary: "One VM; with `wait`, blocks until its state matches",
        query: &[q("wait", false, "`settled`, or comma-separated states (booting, ready, failed, stopped)"),
                 q("timeoutMs", false, "Longest block (ms; at most 300000)")],
        body: None, answers: &[(200, "The VM", Some("Vm")), NOT_FOUND_VM] },
    Route { method: Delete, path: "/api/vms/{id}", surface: Operator, access: Op, handler: Handler::VmDelete,
        summary: "Stop and forget the VM", query: &[], body: None,
        answers: &[(200, "Its last view", Some("Vm")), NOT_FOUND_VM] },
    Route { method: Post, path: "/api/vms/{id}/exec", surface: Operator, access: Op, handler: Handler::VmExec,
        summary: "Run a command in the VM, with a deadline and capped output", query: &[], body: Some("ExecRequest"),
        answers: &[(200, "It ran (whatever its exit status)", Some("ExecResult")), NOT_FOUND_VM, (409, "The VM is not ready", ERR)] },
    Route { method: Get, path: "/api/vms/{id}/files", surface: Operator, access: Op, handler: Handler::VmFileGet,
        summary: "Read a file of the VM (raw bytes; its mode in `X-File-Mode`)",
        query: &[q("path", true, "Absolute path in the VM"), q("maxBytes", false, "Largest file returned (at most 2 MiB)")],
        body: None, answers: &[(200, "The file's bytes", None), NOT_FOUND_VM, (413, "Larger than maxBytes", ERR)] },
    Route { method: Put, path: "/api/vms/{id}/files", surface: Operator, access: Op, handler: Handler::VmFilePut,
        summary: "Write a file of the VM atomically (the body is its contents)",
        query: &[q("path", true, "Absolute path in the VM"), q("mode", false, "Octal permission bits (default 644)"),
                 q("parents", false, "Create missing parent directories")],
        body: Some("RawBytes"), answers: &[(200, "Written and synced", Some("FileWritten")), NOT_FOUND_VM] },
    Route { method: Get, path: "/api/vms/{id}/status", surface: Operator, access: Op, handler: Handler::VmStatus,
        summary: "The agent's report: uptime, its RSS, memory, load", query: &[], body: None,
        answers: &[(200, "The report", Some("Object")), NOT_FOUND_VM] },
    Route { method: Post, path: "/api/auth/start", surface: Operator, access: Op, handler: Handler::SessionStart,
        summary: "Start a login session for a user and provider", query: &[], body: Some("StartSession"),
        answers: &[(201, "The session, with its viewer link", Some("Session")), (400, "An unknown provider", ERR), (503, "The session cap is reached", ERR)] },
    Route { method: Get, path: "/api/auth/providers", surface: Operator, access: Op, handler: Handler::Providers,
        summary: "The providers on offer", query: &[], body: None, answers: &[(200, "The providers", Some("Object"))] },
    Route { method: Get, path: "/api/auth/session/{id}", surface: Operator, access: Op, handler: Handler::SessionGet,
        summary: "The session: state, bounded history, VMs, viewer link", query: &[], body: None,
        answers: &[(200, "The session", Some("Session")), NOT_FOUND_SESSION] },
    Route { method: Get, path: "/api/auth/session/{id}/events", surface: Operator, access: Op, handler: Handler::SessionEvents,
        summary: "Server-Sent Events (`session`): the view now and after every change, until it ends", query: &[TOKEN], body: None,
        answers: &[(200, "text/event-stream", None), NOT_FOUND_SESSION] },
    Route { method: Get, path: "/api/auth/session/{id}/events", surface: Viewer, access: Vt, handler: Handler::ViewerEvents,
        summary: "Server-Sent Events (`session`) for the viewer page", query: &[TOKEN], body: None,
        answers: &[(200, "text/event-stream", None), REFUSED_TOKEN[0], REFUSED_TOKEN[1]] },
    Route { method: Post, path: "/api/auth/session/{id}/cancel", surface: Operator, access: Op, handler: Handler::SessionCancel,
        summary: "End the session; its browser VM is destroyed, nothing is stored", query: &[], body: None,
        answers: &[(200, "Its final view", Some("Session")), NOT_FOUND_SESSION] },
    Route { method: Post, path: "/api/auth/session/{id}/input", surface: Operator, access: Op, handler: Handler::SessionInput,
        summary: "Inject pointer, key and text events into the session's browser", query: &[], body: Some("Input"),
        answers: &[(200, "Injected", Some("Object")), NOT_FOUND_SESSION] },
    Route { method: Get, path: "/api/auth/session/{id}/screenshot", surface: Operator, access: Op, handler: Handler::Screenshot,
        summary: "The session's browser screen as a PNG", query: &[], body: None,
        answers: &[(200, "image/png", None), NOT_FOUND_SESSION] },
    Route { method: Post, path: "/api/auth/session/{id}/viewer-token", surface: Operator, access: Op, handler: Handler::ViewerToken,
        summary: "Mint a fresh viewer link", query: &[], body: Some("ViewerTokenRequest"),
        answers: &[(201, "The link", Some("ViewerLink")), NOT_FOUND_SESSION] },
    Route { method: Get, path: "/session/new", surface: Operator, access: Public, handler: Handler::NewSessionPage,
        summary: "An operator's page to start a login and open its viewer (it asks for the operator token)", query: &[], body: None,
        answers: &[(200, "text/html", None)] },
    Route { method: Get, path: "/api/webrtc/ice-servers", surface: Both, access: Vt, handler: Handler::IceServers,
        summary: "STUN and TURN servers for a session's viewers, with TURN REST credentials",
        query: &[q("session", true, "The session's id"), TOKEN], body: None,
        answers: &[(200, "The servers", Some("IceServers")), REFUSED_TOKEN[0], REFUSED_TOKEN[1]] },
    Route { method: Get, path: "/api/webrtc/session/{id}/ws", surface: Both, access: Vt, handler: Handler::Socket,
        summary: "The signalling WebSocket (upgrade)", query: &[TOKEN], body: None,
        answers: &[(101, "Switching to WebSocket", None), REFUSED_TOKEN[0], REFUSED_TOKEN[1], (409, "The session has its most viewers", ERR)] },
    Route { method: Post, path: "/api/webrtc/session/{id}/offer", surface: Both, access: Vt, handler: Handler::Offer,
        summary: "Non-trickle signalling: an offer with its candidates", query: &[TOKEN], body: Some("Offer"),
        answers: &[(200, "The answer", Some("Answer")), (202, "Pending: ask GET .../answer", Some("Object")), REFUSED_TOKEN[0], REFUSED_TOKEN[1]] },
    Route { method: Get, path: "/api/webrtc/session/{id}/answer", surface: Both, access: Vt, handler: Handler::Answer,
        summary: "The answer to an HTTP offer, once ready",
        query: &[q("viewerId", true, "The viewer the offer answer named"), TOKEN], body: None,
        answers: &[(200, "The answer", Some("Answer")), (202, "Still pending", Some("Object")), REFUSED_TOKEN[0], REFUSED_TOKEN[1]] },
    Route { method: Get, path: "/session/{id}", surface: Both, access: Vt, handler: Handler::ViewerPage,
        summary: "The viewer page (HTML; a refusal is an HTML page too)", query: &[TOKEN], body: None,
        answers: &[(200, "text/html", None), (401, "text/html", None), (403, "text/html", None)] },
    Route { method: Get, path: "/assets/{name}", surface: Both, access: Public, handler: Handler::Asset,
        summary: "The pages' scripts and style", query: &[], body: None,
        answers: &[(200, "The asset", None), (404, "No such asset", None)] },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_listener_has_each_method_and_path_once() {
        for listener in [Listener::Operator, Listener::Viewer] {
            let mut seen = std::collections::HashSet::new();
            for r in ROUTES.iter().filter(|r| r.surface.serves(listener)) {
                assert!(
                    seen.insert((r.method, r.path)),
                    "{:?} {} twice on {listener:?}",
                    r.method,
                    r.path
                );
            }
        }
    }

    #[test]
    fn the_viewers_listener_has_nothing_an_operator_token_opens() {
        for r in ROUTES.iter().filter(|r| r.surface.serves(Listener::Viewer)) {
            assert_ne!(
                r.access,
                Access::Operator,
                "{} on the viewers' listener",
                r.path
            );
        }
    }
}
