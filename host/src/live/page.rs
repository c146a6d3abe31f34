//! The viewer's pages, embedded in the binary: `/session/:id` (watch and
//! drive a session's browser) and `/session/new` (start a session), their
//! script and style, and plain HTML error pages. No build step: plain
//! HTML, JavaScript and CSS in `assets/`. Every page is served with a
//! strict Content-Security-Policy (same origin only, no inline script),
//! `Cache-Control: no-store` and `Referrer-Policy: no-referrer`, because
//! the viewer token travels in the page's URL. Served by
//! [`crate::api::pages`].

use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};

/// The viewer page.
pub const VIEWER_HTML: &str = include_str!("assets/viewer.html");
/// The "start a session" page.
pub const NEW_HTML: &str = include_str!("assets/new.html");

/// Same origin only; no inline script or style; media and frames from
/// blobs the page makes itself; nobody may frame the page.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' blob: data:; media-src 'self' blob:; connect-src 'self'; \
base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Headers of every page and asset.
pub fn headers(content_type: &'static str) -> [(HeaderName, &'static str); 6] {
    [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ]
}

/// A static asset by file name: its content type and text.
pub fn asset(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "viewer.js" => (
            "text/javascript; charset=utf-8",
            include_str!("assets/viewer.js"),
        ),
        "keys.js" => (
            "text/javascript; charset=utf-8",
            include_str!("assets/keys.js"),
        ),
        "new.js" => (
            "text/javascript; charset=utf-8",
            include_str!("assets/new.js"),
        ),
        "viewer.css" => ("text/css; charset=utf-8", include_str!("assets/viewer.css")),
        _ => return None,
    })
}

/// A page with `status`.
pub fn html(status: StatusCode, body: String) -> Response {
    (status, headers("text/html; charset=utf-8"), body).into_response()
}

/// A plain error page saying what went wrong and what to do.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>airlock: {title}</title><link rel=\"stylesheet\" href=\"/assets/viewer.css\"></head>\
<body><main class=\"error\"><h1>{title}</h1><p id=\"banner\">{}</p></main></body></html>\n",
        escape(message)
    );
    html(status, body)
}

/// HTML-escapes text.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_load_only_their_own_scripts() {
        for page in [VIEWER_HTML, NEW_HTML] {
            assert!(!page.contains("<script>"), "no inline script");
            assert!(!page.contains("style="), "no inline style");
            // ` onclick=` and the like; ` on` in prose is fine.
            let handler = page.match_indices(" on").any(|(at, _)| {
                let rest = &page[at + 3..];
                let name = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
                name > 0 && rest[name..].starts_with('=')
            });
            assert!(!handler, "no inline handlers");
        }
        assert!(VIEWER_HTML.contains("id=\"screen\""));
        for name in ["viewer.js", "keys.js", "new.js", "viewer.css"] {
            assert!(asset(name).is_some(), "{name}");
        }
        assert!(asset("../config.rs").is_none());
    }

    #[test]
    fn error_pages_escape_their_message() {
        assert_eq!(
            escape("<b>\"x\" & 'y'"),
            "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;"
        );
    }
}
