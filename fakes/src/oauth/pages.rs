//! HTML of the fake server's pages. Every link and form action is built
//! from the configured base URL, so the pages work wherever the router is
//! mounted. The sign-in and consent pages are laid out for keyboard-only
//! use, because end-to-end tests drive a real Chromium only with keys:
//! the username field has `autofocus` and Enter submits; on the consent
//! page Allow has `autofocus` and Deny is the next Tab stop.

/// Escapes text for HTML element content and quoted attribute values.
pub(super) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}

fn layout(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title}</title><style>\
body{{font-family:sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem;color:#222}}\
label{{display:block;margin:.8rem 0}}input{{display:block;width:100%;padding:.4rem;font-size:1rem}}\
button{{font-size:1rem;padding:.5rem 1.2rem;margin:.8rem .6rem 0 0}}\
.error{{color:#b00020}}code{{font-size:1.1rem;word-break:break-all;background:#f3f3f3;padding:.3rem}}\
</style></head><body>\n<h1>{title}</h1>\n{body}\n</body></html>\n",
        title = esc(title),
    )
}

/// The sign-in form. `device` names the user code being approved, if any.
pub(super) fn sign_in(
    base: &str,
    request_id: &str,
    client_name: &str,
    error: Option<&str>,
    device: Option<&str>,
) -> String {
    let error = error
        .map(|e| {
            format!(
                "<p class=\"error\" id=\"login-error\" role=\"alert\">{}</p>\n",
                esc(e)
            )
        })
        .unwrap_or_default();
    let device = device
        .map(|code| {
            format!(
                "<p>Connecting a device with code <strong id=\"user-code\">{}</strong>.</p>\n",
                esc(code)
            )
        })
        .unwrap_or_default();
    let body = format!(
        "<p>Sign in to continue to {client}.</p>\n{device}{error}\
<form method=\"post\" action=\"{base}/authorize/login\">\n\
<input type=\"hidden\" name=\"request_id\" value=\"{rid}\">\n\
<label>Username <input type=\"text\" name=\"username\" id=\"username\" autocomplete=\"username\" autofocus required></label>\n\
<label>Password <input type=\"password\" name=\"password\" id=\"password\" autocomplete=\"current-password\" required></label>\n\
<button type=\"submit\" id=\"sign-in\">Sign in</button>\n</form>",
        client = esc(client_name),
        base = esc(base),
        rid = esc(request_id),
    );
    layout("Sign in", &body)
}

/// The consent page: Allow (focused) then Deny, nothing focusable between.
pub(super) fn consent(base: &str, request_id: &str, client_name: &str, username: &str) -> String {
    let body = format!(
        "<p>Signed in as <strong id=\"signed-in-user\">{user}</strong>.</p>\n\
<form method=\"post\" action=\"{base}/authorize/decision\">\n\
<input type=\"hidden\" name=\"request_id\" value=\"{rid}\">\n\
<p id=\"consent-question\">Allow {client} to access your account?</p>\n\
<button type=\"submit\" name=\"decision\" value=\"allow\" id=\"allow\" autofocus>Allow</button>\
<button type=\"submit\" name=\"decision\" value=\"deny\" id=\"deny\">Deny</button>\n</form>",
        user = esc(username),
        base = esc(base),
        rid = esc(request_id),
        client = esc(client_name),
    );
    layout(&format!("Allow {client_name}?"), &body)
}

/// An error the user sees instead of being redirected.
pub(super) fn error(message: &str) -> String {
    let body = format!("<p class=\"error\" id=\"oauth-error\">{}</p>", esc(message));
    layout("Sign-in error", &body)
}

/// The hosted "copy this code" page (Claude's manual flow).
pub(super) fn code(code_and_state: &str) -> String {
    let body = format!(
        "<p>Paste this code into the CLI where it asks for it:</p>\n\
<p><code id=\"oauth-code\">{}</code></p>",
        esc(code_and_state)
    );
    layout("Authentication code", &body)
}

/// The hosted page when the authorization ended in an error.
pub(super) fn code_error(message: &str) -> String {
    let body = format!(
        "<p class=\"error\" id=\"oauth-error\">{}</p>\n<p>Return to the CLI and try again.</p>",
        esc(message)
    );
    layout("Authentication failed", &body)
}

/// Where CLIs send the browser after a successful login.
pub(super) fn success(app: &str) -> String {
    let body = format!(
        "<p id=\"oauth-success\">You are signed in to {}. You can close this window.</p>",
        esc(app)
    );
    layout("Signed in", &body)
}

/// Where CLIs send the browser after a failed login.
pub(super) fn failure(app: &str) -> String {
    let body = format!(
        "<p class=\"error\" id=\"oauth-error\">Signing in to {} failed. Return to the CLI.</p>",
        esc(app)
    );
    layout("Sign-in failed", &body)
}

/// The device-code entry form.
pub(super) fn device_entry(base: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| {
            format!(
                "<p class=\"error\" id=\"device-error\" role=\"alert\">{}</p>\n",
                esc(e)
            )
        })
        .unwrap_or_default();
    let body = format!(
        "<p>Enter the code shown on your device.</p>\n{error}\
<form method=\"get\" action=\"{base}/device\">\n\
<label>Code <input type=\"text\" name=\"user_code\" id=\"user_code\" autocomplete=\"off\" autofocus required></label>\n\
<button type=\"submit\">Continue</button>\n</form>",
        base = esc(base),
    );
    layout("Connect a device", &body)
}

/// After the user approved or denied a device.
pub(super) fn device_done(approved: bool) -> String {
    if approved {
        layout(
            "Device connected",
            "<p id=\"device-approved\">Your device is connected. You can return to it now.</p>",
        )
    } else {
        layout(
            "Device not connected",
            "<p id=\"device-denied\">You denied access. The device will not be signed in.</p>",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_interpolated_is_escaped() {
        let page = error("<script>alert('x')</script>");
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
    }

    #[test]
    fn consent_puts_deny_right_after_allow() {
        let page = consent("http://h/p", "rid", "Codex CLI", "alice");
        let allow = page
            .find("id=\"allow\" autofocus")
            .expect("allow is focused");
        let deny = page.find("id=\"deny\"").expect("deny exists");
        let between = &page[allow..deny];
        // Only Deny's own opening tag lies between the two ids.
        assert_eq!(between.matches("<button").count(), 1);
        assert_eq!(between.matches("<input").count(), 0);
        assert_eq!(between.matches("<a ").count(), 0);
        assert!(page.contains("action=\"http://h/p/authorize/decision\""));
    }
}
