//! The fixed OAuth clients of the fake server, named after the real CLIs,
//! and the redirect-URI rules each one is registered with. Used by the
//! authorize and token handlers; public so callers can name client ids
//! without repeating string literals.

/// Client id of the fake server's Codex-shaped client (Codex's loopback
/// ports), which its own tests sign in with.
pub const CODEX: &str = "codex-cli";
/// Client id of the fake server's Claude-Code-shaped client.
pub const CLAUDE: &str = "claude-code";
/// Client id of the fake server's Gemini-CLI-shaped client.
pub const GEMINI: &str = "gemini-cli";
/// Client id of airlock's own demo CLI.
pub const DEMO: &str = "airlock-demo";
/// The real Codex CLI's client id at auth.openai.com (codex-rs
/// `login/src/auth`: CLIENT_ID).
pub const OPENAI_CODEX: &str = "app_EMoamEEZ73f0CkXaXp7hrann";
/// The real Claude Code's client id at claude.com / platform.claude.com.
pub const ANTHROPIC_CLAUDE_CODE: &str = "9d1c250a-e61b-44d9-88ed-5944d1962f5e";
/// The real Gemini CLI's installed-app client id at Google.
pub const GOOGLE_GEMINI_CLI: &str =
    "681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com";
/// Its client secret: public, shipped in the Gemini CLI's sources, and
/// checked by Google's token endpoint all the same.
pub const GOOGLE_GEMINI_CLI_SECRET: &str = "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";

/// Path, under the server's base URL, of the hosted "copy this code" page.
pub const HOSTED_CODE_PATH: &str = "/code/callback";

/// One way a redirect URI may be allowed.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// Exactly this URI.
    Exact(&'static str),
    /// `{base_url}` followed by this path (the hosted code page).
    Hosted(&'static str),
    /// `http://{host}:{any port}{path}`, as RFC 8252 §7.3 loopback
    /// redirects: the port is chosen by the client at run time.
    Loopback {
        host: &'static str,
        path: &'static str,
    },
}

/// How tokens issued to a client look, so that leak scanners in airlock
/// see the shapes the real vendors issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenStyle {
    /// OpenAI: the access token is itself a JWT; claims carry the
    /// ChatGPT account under `https://api.openai.com/auth`.
    OpenAi,
    /// Anthropic: `sk-ant-oat01-…` / `sk-ant-ort01-…`.
    Anthropic,
    /// Google: `ya29.…` access tokens, `1//…` refresh tokens.
    Google,
    /// airlock's demo: plainly labelled opaque strings.
    Demo,
}

/// A registered client.
#[derive(Debug)]
pub(crate) struct Client {
    /// The `client_id`.
    pub id: &'static str,
    /// Shown on the consent page ("Allow {name} to access your account?").
    pub name: &'static str,
    /// Shapes of the tokens it gets.
    pub style: TokenStyle,
    /// Whether an authorization request without PKCE is refused (Google
    /// accepts installed apps without it; the others require S256).
    pub pkce_required: bool,
    /// The secret the token endpoint requires, for confidential-style
    /// installed apps (Google's).
    pub secret: Option<&'static str>,
    /// Whether a refresh answers with a new refresh token and revokes the
    /// old one (OpenAI and Anthropic rotate; Google does not).
    pub rotates_refresh: bool,
    rules: &'static [Rule],
}

static CLIENTS: [Client; 7] = [
    // Codex registers exactly 1455 and its fallback 1457
    // (codex-rs/login/src/server.rs: DEFAULT_PORT, FALLBACK_PORT).
    Client {
        id: CODEX,
        name: "Codex CLI",
        style: TokenStyle::OpenAi,
        pkce_required: true,
        secret: None,
        rotates_refresh: false,
        rules: &[
            Rule::Exact("http://localhost:1455/auth/callback"),
            Rule::Exact("http://localhost:1457/auth/callback"),
        ],
    },
    // Claude Code: automatic flow on a random localhost port, manual flow
    // via the hosted page (platform.claude.com/oauth/code/callback).
    Client {
        id: CLAUDE,
        name: "Claude Code",
        style: TokenStyle::Anthropic,
        pkce_required: true,
        secret: None,
        rotates_refresh: false,
        rules: &[
            Rule::Hosted(HOSTED_CODE_PATH),
            Rule::Loopback {
                host: "localhost",
                path: "/callback",
            },
        ],
    },
    // Gemini CLI: loopback on 127.0.0.1 (current) or localhost (older
    // releases); the hosted page stands in for codeassist.google.com/authcode
    // used by its NO_BROWSER user-code flow.
    Client {
        id: GEMINI,
        name: "Gemini CLI",
        style: TokenStyle::Google,
        pkce_required: true,
        secret: None,
        rotates_refresh: false,
        rules: &[
            Rule::Loopback {
                host: "localhost",
                path: "/oauth2callback",
            },
            Rule::Loopback {
                host: "127.0.0.1",
                path: "/oauth2callback",
            },
            Rule::Hosted(HOSTED_CODE_PATH),
        ],
    },
    Client {
        id: DEMO,
        name: "airlock demo CLI",
        style: TokenStyle::Demo,
        pkce_required: true,
        secret: None,
        rotates_refresh: false,
        rules: &[
            Rule::Exact("http://localhost:1460/auth/callback"),
            Rule::Exact("http://localhost:1461/auth/callback"),
        ],
    },
    // The real CLIs' registrations, as the vendor sandbox serves them.
    // Codex 0.171 sends http://127.0.0.1:1455/auth/callback (1457 when
    // 1455 is taken; older releases said localhost); its device flow
    // redeems with auth.openai.com's own callback.
    Client {
        id: OPENAI_CODEX,
        name: "Codex CLI",
        style: TokenStyle::OpenAi,
        pkce_required: true,
        secret: None,
        rotates_refresh: true,
        rules: &[
            Rule::Exact("http://127.0.0.1:1455/auth/callback"),
            Rule::Exact("http://127.0.0.1:1457/auth/callback"),
            Rule::Exact("http://localhost:1455/auth/callback"),
            Rule::Exact("http://localhost:1457/auth/callback"),
            Rule::Exact("https://auth.openai.com/deviceauth/callback"),
        ],
    },
    // Claude Code 2.1: http://localhost:{random}/callback for the browser,
    // the hosted code page for a pasted code.
    Client {
        id: ANTHROPIC_CLAUDE_CODE,
        name: "Claude Code",
        style: TokenStyle::Anthropic,
        pkce_required: true,
        secret: None,
        rotates_refresh: true,
        rules: &[
            Rule::Loopback {
                host: "localhost",
                path: "/callback",
            },
            Rule::Exact("https://platform.claude.com/oauth/code/callback"),
        ],
    },
    // Gemini CLI 0.61: http://127.0.0.1:{random}/oauth2callback without
    // PKCE; its user-code flow uses codeassist.google.com/authcode with it.
    Client {
        id: GOOGLE_GEMINI_CLI,
        name: "Gemini Code Assist",
        style: TokenStyle::Google,
        pkce_required: false,
        secret: Some(GOOGLE_GEMINI_CLI_SECRET),
        rotates_refresh: false,
        rules: &[
            Rule::Loopback {
                host: "127.0.0.1",
                path: "/oauth2callback",
            },
            Rule::Loopback {
                host: "localhost",
                path: "/oauth2callback",
            },
            Rule::Exact("https://codeassist.google.com/authcode"),
        ],
    },
];

/// The registered client with this id, if any.
pub(crate) fn find(client_id: &str) -> Option<&'static Client> {
    CLIENTS.iter().find(|c| c.id == client_id)
}

/// Whether `client_id` is registered and `redirect_uri` is one of its
/// allowed redirect URIs, given the server's `base_url`. Matching is exact
/// (no prefix, query or fragment tolerance), as OAuth 2.1 requires.
pub fn redirect_allowed(client_id: &str, base_url: &str, redirect_uri: &str) -> bool {
    find(client_id).is_some_and(|c| c.allows(base_url, redirect_uri))
}

impl Client {
    /// Whether `uri` matches one of this client's rules.
    pub fn allows(&self, base_url: &str, uri: &str) -> bool {
        self.rules.iter().any(|rule| match *rule {
            Rule::Exact(exact) => uri == exact,
            Rule::Hosted(path) => uri.strip_prefix(base_url).is_some_and(|rest| rest == path),
            Rule::Loopback { host, path } => loopback_port(uri, host, path).is_some(),
        })
    }
}

/// The port of `http://{host}:{port}{path}` if `uri` is exactly that, with
/// an explicit, non-zero, decimal port.
fn loopback_port(uri: &str, host: &str, path: &str) -> Option<u16> {
    let rest = uri
        .strip_prefix("http://")?
        .strip_prefix(host)?
        .strip_prefix(':')?;
    let digits_end = rest.find(|c: char| !c.is_ascii_digit())?;
    let (digits, tail) = rest.split_at(digits_end);
    if digits.is_empty() || digits.len() > 5 || digits.starts_with('0') || tail != path {
        return None;
    }
    digits.parse::<u16>().ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "http://127.0.0.1:4000/demo/oauth";

    #[test]
    fn codex_allows_only_its_two_registered_ports() {
        assert!(redirect_allowed(
            CODEX,
            BASE,
            "http://localhost:1455/auth/callback"
        ));
        assert!(redirect_allowed(
            CODEX,
            BASE,
            "http://localhost:1457/auth/callback"
        ));
        assert!(!redirect_allowed(
            CODEX,
            BASE,
            "http://localhost:1456/auth/callback"
        ));
        assert!(!redirect_allowed(
            CODEX,
            BASE,
            "http://127.0.0.1:1455/auth/callback"
        ));
        assert!(!redirect_allowed(
            CODEX,
            BASE,
            "http://localhost:1455/auth/callback?x=1"
        ));
    }

    #[test]
    fn claude_allows_the_hosted_page_under_the_base_url_and_any_localhost_port() {
        assert!(redirect_allowed(
            CLAUDE,
            BASE,
            &format!("{BASE}/code/callback")
        ));
        assert!(redirect_allowed(
            CLAUDE,
            BASE,
            "http://localhost:54545/callback"
        ));
        assert!(!redirect_allowed(
            CLAUDE,
            BASE,
            "http://127.0.0.1:4000/code/callback"
        ));
        assert!(!redirect_allowed(CLAUDE, BASE, "http://localhost/callback"));
        assert!(!redirect_allowed(
            CLAUDE,
            BASE,
            "http://localhost:0/callback"
        ));
        assert!(!redirect_allowed(
            CLAUDE,
            BASE,
            "http://localhost:70000/callback"
        ));
        assert!(!redirect_allowed(
            CLAUDE,
            BASE,
            "http://localhost:5454/callback/x"
        ));
        assert!(!redirect_allowed(
            CLAUDE,
            BASE,
            "https://localhost:5454/callback"
        ));
        assert!(!redirect_allowed(
            CLAUDE,
            BASE,
            "http://localhost.evil:5454/callback"
        ));
    }

    #[test]
    fn gemini_allows_both_loopback_spellings() {
        assert!(redirect_allowed(
            GEMINI,
            BASE,
            "http://localhost:38123/oauth2callback"
        ));
        assert!(redirect_allowed(
            GEMINI,
            BASE,
            "http://127.0.0.1:38123/oauth2callback"
        ));
        assert!(!redirect_allowed(
            GEMINI,
            BASE,
            "http://[::1]:38123/oauth2callback"
        ));
        assert!(!redirect_allowed(
            GEMINI,
            BASE,
            "http://127.0.0.1:38123/callback"
        ));
    }

    #[test]
    fn demo_allows_1460_and_1461() {
        assert!(redirect_allowed(
            DEMO,
            BASE,
            "http://localhost:1460/auth/callback"
        ));
        assert!(redirect_allowed(
            DEMO,
            BASE,
            "http://localhost:1461/auth/callback"
        ));
        assert!(!redirect_allowed(
            DEMO,
            BASE,
            "http://localhost:1455/auth/callback"
        ));
    }

    #[test]
    fn unknown_clients_allow_nothing() {
        assert!(!redirect_allowed(
            "nope",
            BASE,
            "http://localhost:1455/auth/callback"
        ));
    }

    #[test]
    fn ports_with_leading_zeros_or_signs_are_not_ports() {
        assert_eq!(
            loopback_port("http://localhost:01455/callback", "localhost", "/callback"),
            None
        );
        assert_eq!(
            loopback_port("http://localhost:+1455/callback", "localhost", "/callback"),
            None
        );
        assert_eq!(
            loopback_port("http://localhost:1455/callback", "localhost", "/callback"),
            Some(1455)
        );
    }
}
