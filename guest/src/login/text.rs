//! Text handling for logins: stripping terminal escape sequences from a
//! CLI's PTY output, finding the authorization URL in it, and expanding
//! `${VAR}` in the provider's environment and paths. Pure functions, used
//! by [`super::session`].

use std::collections::BTreeMap;

/// Removes ANSI/VT escape sequences (CSI, OSC, two-byte escapes) and
/// carriage returns, keeping newlines and tabs.
pub fn strip_ansi(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \ (hyperlinks carry URLs here,
                // but the visible text repeats them).
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.peek() == Some(&'\\')) {
                            if c == '\u{1b}' {
                                chars.next();
                            }
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\r' => {}
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// URLs in `text` that look like an authorization or device verification
/// page, in order. URLs of the CLI's own loopback server are never
/// returned: opening one would be a stray request, which some CLIs (Gemini)
/// treat as fatal. A loopback URL that names an OAuth client is an
/// authorization server on this machine (the demo provider, the fakes).
pub fn auth_urls(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
        .filter(|w| w.starts_with("https://") || w.starts_with("http://"))
        .map(|w| w.trim_end_matches(['.', ',', ')', ']', ';']))
        .filter_map(|w| url::Url::parse(w).ok())
        .filter(|u| {
            let names_client = u.query_pairs().any(|(k, _)| k == "client_id");
            if is_loopback(u) {
                return names_client;
            }
            names_client || u.path().contains("authorize") || u.path().contains("device")
        })
        .map(|u| u.to_string())
        .collect()
}

/// The one-time code a device-code flow's CLI printed after its
/// verification URL: the first word after that URL with the shape of a
/// user code ([`airlock_proto::is_user_code`]). Looking only after the URL
/// keeps version banners and other capitalised words out; a word still
/// being printed (no whitespace after it yet) is not taken.
pub fn user_code(text: &str) -> Option<String> {
    let url = auth_urls(text).into_iter().next()?;
    let host_path = location(&url);
    let at = text.find(host_path.trim_end_matches('/'))?;
    let end = text.rfind(char::is_whitespace)?;
    text.get(at..end)?
        .split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | ':'))
        .skip(1)
        .map(|w| w.trim_end_matches(['.', ',', ')', ']', ';']))
        .find(|w| airlock_proto::is_user_code(w))
        .map(str::to_string)
}

/// The last line of `tail` that contains `text` (a profile's `fail_when`),
/// without the borders of the box a TUI draws around its messages.
pub fn failure_line<'a>(tail: &'a str, text: &'a str) -> &'a str {
    tail.lines()
        .rev()
        .find(|l| l.contains(text))
        .unwrap_or(text)
        .trim_matches(|c: char| c.is_whitespace() || ('\u{2500}'..='\u{257f}').contains(&c))
}

/// True when the URL's `redirect_uri` points at a hosted page (the page
/// that shows a paste-code flow's code) rather than at the CLI's own
/// loopback server: the redirect goes to the authorization server's own
/// origin, or anywhere off this machine.
pub fn redirects_to_hosted_page(url: &str) -> bool {
    let Ok(u) = url::Url::parse(url) else {
        return false;
    };
    let redirect = u
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned());
    let Some(r) = redirect.and_then(|r| url::Url::parse(&r).ok()) else {
        return false;
    };
    r.origin() == u.origin() || !is_loopback(&r)
}

/// True for URLs on this machine (localhost, 127.0.0.0/8, ::1).
pub fn is_loopback(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d == "localhost" || d.ends_with(".localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// `scheme://host[:port]/path` of a URL: where it points without its query
/// (which carries state and PKCE values), for events and logs.
pub fn location(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.path()
            )
        }
        Err(_) => "<unparsable URL>".into(),
    }
}

/// An unknown variable in a template.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown variable ${{{0}}} in {1:?}")]
pub struct ExpandError(pub String, pub String);

/// Expands `${NAME}` from `vars`; `$` not followed by `{` stays literal.
pub fn expand(template: &str, vars: &BTreeMap<String, String>) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[at..]);
            return Ok(out);
        };
        let name = &after[..end];
        let value = vars
            .get(name)
            .ok_or_else(|| ExpandError(name.into(), template.into()))?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colours_cursor_moves_and_hyperlinks() {
        let raw =
            "\u{1b}[1;32mOpen\u{1b}[0m \u{1b}]8;;https://x\u{7}link\u{1b}]8;;\u{1b}\\ now\r\n";
        assert_eq!(strip_ansi(raw), "Open link now\n");
    }

    #[test]
    fn finds_the_authorize_url_not_the_local_server() {
        let out = "Starting local login server on http://localhost:1455.\n\
                   If your browser did not open, navigate to this URL:\n\n\
                   https://auth.example.com/oauth/authorize?response_type=code&client_id=abc&state=xyz.\n";
        assert_eq!(
            auth_urls(out),
            vec!["https://auth.example.com/oauth/authorize?response_type=code&client_id=abc&state=xyz".to_string()]
        );
        assert!(auth_urls("see http://127.0.0.1:8080/oauth2callback?code=1&state=2").is_empty());
        assert!(auth_urls("see http://localhost:1455/auth/callback").is_empty());
        // An authorization server on this machine (the demo provider).
        assert_eq!(
            auth_urls("go to http://127.0.0.1:4000/demo/oauth/authorize?client_id=1 now").len(),
            1
        );
        assert!(auth_urls("docs at https://example.com/help").is_empty());
    }

    #[test]
    fn finds_the_user_code_after_the_verification_url() {
        // Codex 0.171's device banner, escape sequences removed.
        let out = "Welcome to Codex [v0.171.0]\nOpenAI's command-line coding agent\n\n\
                   1. Open this link in your browser and sign in to your account\n   \
                   https://auth.openai.com/codex/device\n\n\
                   2. Enter this one-time code (expires in 15 minutes)\n   WDJB-MJHT\n";
        assert_eq!(user_code(out).as_deref(), Some("WDJB-MJHT"));
        // Not yet printed, or no URL to anchor on.
        assert_eq!(user_code(&out[..out.len() - 10]), None);
        assert_eq!(user_code(&out[..out.len() - 3]), None);
        assert_eq!(user_code("code WDJB-MJHT"), None);
    }

    #[test]
    fn a_failure_line_loses_its_box() {
        let tail = "│ Failed to sign in. Message: old │\n╭──╮\n│   Failed to sign in. Message: Unexpected request: /favicon.ico   │\n╰──╯\n";
        assert_eq!(
            failure_line(tail, "Failed to sign in. Message:"),
            "Failed to sign in. Message: Unexpected request: /favicon.ico"
        );
    }

    #[test]
    fn hosted_page_redirects_are_told_from_loopback_ones() {
        let hosted =
            "https://a.b/authorize?client_id=c&redirect_uri=https%3A%2F%2Fa.b%2Fcode%2Fcallback";
        let loopback =
            "https://a.b/authorize?client_id=c&redirect_uri=http%3A%2F%2Flocalhost%3A5%2Fcallback";
        assert!(redirects_to_hosted_page(hosted));
        assert!(!redirects_to_hosted_page(loopback));
        assert!(!redirects_to_hosted_page(
            "https://a.b/authorize?client_id=c"
        ));
    }

    #[test]
    fn location_drops_the_query() {
        assert_eq!(
            location("https://a.b/oauth/authorize?state=secret"),
            "https://a.b/oauth/authorize"
        );
        assert_eq!(
            location("http://127.0.0.1:4000/x?code=1"),
            "http://127.0.0.1:4000/x"
        );
    }

    #[test]
    fn expands_variables_and_rejects_unknown_ones() {
        let vars: BTreeMap<String, String> = [("HOME".to_string(), "/h".to_string())].into();
        assert_eq!(
            expand("${HOME}/.codex/auth.json", &vars).unwrap(),
            "/h/.codex/auth.json"
        );
        assert_eq!(expand("cost $5", &vars).unwrap(), "cost $5");
        assert_eq!(
            expand("${NOPE}/x", &vars),
            Err(ExpandError("NOPE".into(), "${NOPE}/x".into()))
        );
    }
}
