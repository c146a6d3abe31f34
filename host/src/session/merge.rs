//! Credential files that are one JSON object shared with the person's own
//! settings (Claude Code keeps the signed-in account in `~/.claude.json`,
//! beside the person's theme, projects and history): only the profile's
//! `merge_keys` are taken from the browser VM's copy, and delivery sets
//! just those keys in the CLI VM's file, leaving every other key alone.
//! Called by [`super::run`] when a credential is stored and by
//! [`super::delivery`] when it is written.

use serde_json::{Map, Value};

/// A file that should be a JSON object is not one.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The browser VM's copy.
    #[error("the captured {path} is not a JSON object{detail}")]
    Captured {
        /// The file, as the profile names it.
        path: String,
        /// Where parsing stopped (no content).
        detail: String,
    },
    /// The CLI VM's copy: it is the person's; it is not overwritten.
    #[error("{path} in the CLI VM is not a JSON object ({detail}); it was left as it is")]
    Existing {
        /// The file in the CLI VM.
        path: String,
        /// Where parsing stopped (no content).
        detail: String,
    },
}

fn object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("another JSON value".into()),
        // Line and column only: the message could quote the content.
        Err(e) => Err(format!(
            "invalid JSON at line {} column {}",
            e.line(),
            e.column()
        )),
    }
}

/// The captured file reduced to `keys` (those present).
pub fn keep_keys(path: &str, bytes: &[u8], keys: &[String]) -> Result<Vec<u8>, MergeError> {
    let all = object(bytes).map_err(|detail| MergeError::Captured {
        path: path.into(),
        detail: format!(": {detail}"),
    })?;
    let kept: Map<String, Value> = all.into_iter().filter(|(k, _)| keys.contains(k)).collect();
    Ok(Value::Object(kept).to_string().into_bytes())
}

/// `existing` (the CLI VM's file, `None` when there is none) with every
/// key of `kept` set; pretty-printed as the CLIs write it.
pub fn merge_into(path: &str, existing: Option<&[u8]>, kept: &[u8]) -> Result<Vec<u8>, MergeError> {
    let mut base = match existing {
        Some(bytes) if !bytes.iter().all(u8::is_ascii_whitespace) => {
            object(bytes).map_err(|detail| MergeError::Existing {
                path: path.into(),
                detail,
            })?
        }
        _ => Map::new(),
    };
    let kept = object(kept).map_err(|detail| MergeError::Captured {
        path: path.into(),
        detail: format!(" (stored): {detail}"),
    })?;
    base.extend(kept);
    let mut out = serde_json::to_vec_pretty(&Value::Object(base)).unwrap_or_default();
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_the_profiles_keys_are_kept() {
        let captured = br#"{"userID":"u1","oauthAccount":{"emailAddress":"a@x"},"numStartups":3}"#;
        let kept = keep_keys("/c.json", captured, &keys(&["oauthAccount", "absent"])).unwrap();
        let v: Value = serde_json::from_slice(&kept).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"oauthAccount": {"emailAddress": "a@x"}})
        );
    }

    #[test]
    fn merging_sets_the_keys_and_keeps_the_persons_own() {
        let kept = br#"{"oauthAccount":{"emailAddress":"new@x"}}"#;
        let existing = br#"{"theme":"dark","oauthAccount":{"emailAddress":"old@x","x":1}}"#;
        let merged = merge_into("/c.json", Some(existing), kept).unwrap();
        let v: Value = serde_json::from_slice(&merged).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"theme": "dark", "oauthAccount": {"emailAddress": "new@x"}})
        );
        for none in [None, Some(&b""[..]), Some(&b" \n"[..])] {
            let v: Value =
                serde_json::from_slice(&merge_into("/c.json", none, kept).unwrap()).unwrap();
            assert_eq!(
                v,
                serde_json::json!({"oauthAccount": {"emailAddress": "new@x"}})
            );
        }
    }

    #[test]
    fn what_is_not_an_object_is_refused_without_quoting_it() {
        let e = merge_into("/c.json", Some(b"[\"secret-ish\"]"), b"{}").unwrap_err();
        assert!(matches!(e, MergeError::Existing { .. }), "{e}");
        let e = merge_into("/c.json", Some(b"{\"a\": secret-ish"), b"{}").unwrap_err();
        assert!(!e.to_string().contains("secret-ish"), "{e}");
        let e = keep_keys("/c.json", b"not json secret-ish", &keys(&["a"])).unwrap_err();
        assert!(matches!(e, MergeError::Captured { .. }), "{e}");
        assert!(!e.to_string().contains("secret-ish"), "{e}");
    }
}
