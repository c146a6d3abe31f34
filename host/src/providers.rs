//! Provider profiles: for each AI coding CLI, how its login runs (command,
//! environment, flow), which files hold the credential, which fields must
//! be there, how the login is confirmed, and where each file goes in the
//! user's CLI VM. Loaded from a TOML file the operator can extend
//! (`config/providers.toml` ships codex, claude_code, gemini_cli and demo).
//! Used by the session manager to build [`LoginSpec`]s and deliveries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use airlock_proto::{Confirm, CredentialSpec, LoginFlow, LoginSpec, PromptAnswer};
use serde::{Deserialize, Serialize};

use crate::egress::policy::DestPattern;

/// The providers file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// It could not be read.
    #[error("cannot read providers file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// It is not valid TOML for the schema.
    #[error("invalid providers file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A profile breaks a rule.
    #[error("provider {name}: {problem}")]
    Invalid {
        /// The profile.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// One credential file of a provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderCredential {
    /// Where the CLI writes it in the browser VM (`${VAR}` templates).
    pub path: String,
    /// JSON pointers that must hold non-empty values.
    #[serde(default)]
    pub required: Vec<String>,
    /// Where it goes in the user's CLI VM (absolute).
    pub deliver_to: String,
    /// For a JSON object shared with the person's own settings: the only
    /// top-level keys taken from it; delivery sets just these in the CLI
    /// VM's file and leaves the rest (see `session::merge`).
    #[serde(default)]
    pub merge_keys: Vec<String>,
}

/// How one CLI logs in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    /// Shown to people.
    pub display_name: String,
    /// The login command.
    pub command: Vec<String>,
    /// Environment of the login, in order (`NAME=value`, `${VAR}` allowed).
    #[serde(default)]
    pub env: Vec<String>,
    /// How the user is reached.
    pub flow: LoginFlow,
    /// Prompts of the CLI to answer (`when` it prints this, `send` that).
    #[serde(default)]
    pub answers: Vec<PromptAnswer>,
    /// How a capture is confirmed.
    pub confirm: Confirm,
    /// The credential's files.
    pub credentials: Vec<ProviderCredential>,
    /// Only available when the built-in demo OAuth server is on.
    #[serde(default)]
    pub demo: bool,
    /// Where the login may connect from the browser VM (Chromium, the CLI):
    /// `host:port`, `*.example.com:443`, `host:*`. Nothing else is reachable.
    #[serde(default)]
    pub egress: Vec<String>,
    /// Environment variables through which the CLI takes an extra CA file
    /// (set only when airlockd's `auth.extra_ca_file` is: tests).
    #[serde(default)]
    pub ca_env: Vec<String>,
    /// Texts the CLI prints when its login failed but it keeps running.
    #[serde(default)]
    pub fail_when: Vec<String>,
    /// Files the CLI needs beside the credential in the user's CLI VM to
    /// use it without questions (settings, onboarding state).
    #[serde(default)]
    pub cli_files: Vec<CliFile>,
}

/// A fixed file delivered with a provider's credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliFile {
    /// Absolute path in the user's CLI VM.
    pub path: String,
    /// Its contents.
    pub contents: String,
}

/// The loaded profiles.
#[derive(Debug, Clone)]
pub struct Providers {
    map: BTreeMap<String, Provider>,
}

/// Knobs from airlockd's config that shape every login.
#[derive(Debug, Clone, Default)]
pub struct LoginDefaults {
    /// Directories appended to the CLI's `PATH` (development fakes).
    pub path_append: Vec<String>,
    /// Extra environment for every login.
    pub env: BTreeMap<String, String>,
    /// Deadline for the CLI to produce its URL (ms).
    pub url_timeout_ms: u64,
    /// Deadline for a status command (ms).
    pub confirm_timeout_ms: u64,
}

impl Providers {
    /// Loads `path`; demo profiles are dropped unless `demo` is on.
    pub fn load(path: &Path, demo: bool) -> Result<Self, ProviderError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProviderError::Read {
            path: path.into(),
            source,
        })?;
        let mut map: BTreeMap<String, Provider> =
            toml::from_str(&text).map_err(|source| ProviderError::Parse {
                path: path.into(),
                source: Box::new(source),
            })?;
        map.retain(|_, p| demo || !p.demo);
        for (name, p) in &map {
            validate(name, p)?;
        }
        Ok(Self { map })
    }

    /// The profile called `name`.
    pub fn get(&self, name: &str) -> Option<&Provider> {
        self.map.get(name)
    }

    /// All profile names.
    pub fn names(&self) -> Vec<&str> {
        self.map.keys().map(String::as_str).collect()
    }
}

fn validate(name: &str, p: &Provider) -> Result<(), ProviderError> {
    let bad = |problem: &str| {
        Err(ProviderError::Invalid {
            name: name.into(),
            problem: problem.into(),
        })
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return bad("names are lowercase letters, digits and _");
    }
    if p.command.is_empty() || p.command[0].is_empty() {
        return bad("command must name a program");
    }
    if p.credentials.is_empty() || p.credentials.len() > airlock_proto::MAX_CREDENTIAL_FILES {
        return bad("needs 1 to 8 credential files");
    }
    if p.credentials
        .iter()
        .any(|c| !c.deliver_to.starts_with('/') || c.deliver_to.contains(".."))
    {
        return bad("deliver_to must be an absolute path without ..");
    }
    if p.env.iter().any(|e| !e.contains('=') || e.starts_with('=')) {
        return bad("env entries are NAME=value");
    }
    if p.credentials
        .iter()
        .any(|c| c.required.iter().any(|r| !r.starts_with('/')))
    {
        return bad("required fields are JSON pointers starting with /");
    }
    if p.credentials.iter().any(|c| {
        c.merge_keys.len() > 16 || c.merge_keys.iter().any(|k| k.is_empty() || k.len() > 128)
    }) {
        return bad("merge_keys are at most 16 top-level keys of up to 128 bytes");
    }
    if let Some(e) = p.egress.iter().find_map(|d| d.parse::<DestPattern>().err()) {
        return bad(&e.to_string());
    }
    if p.cli_files
        .iter()
        .any(|f| !f.path.starts_with('/') || f.path.contains("..") || f.contents.len() > 64 << 10)
    {
        return bad("cli_files need absolute paths without .. and at most 64 KiB each");
    }
    if p.credentials.len() + p.cli_files.len() > airlock_proto::MAX_CREDENTIAL_FILES {
        return bad("credentials and cli_files together are at most 8 files");
    }
    Ok(())
}

impl Provider {
    /// The CLI-VM paths of its files that are merged, not replaced.
    pub fn merged_paths(&self) -> Vec<String> {
        self.credentials
            .iter()
            .filter(|c| !c.merge_keys.is_empty())
            .map(|c| c.deliver_to.clone())
            .collect()
    }

    /// The destinations its login may reach (checked when loaded).
    pub fn egress_patterns(&self) -> Vec<DestPattern> {
        self.egress.iter().filter_map(|d| d.parse().ok()).collect()
    }

    /// The agent's instructions for one session's login.
    pub fn login_spec(&self, name: &str, session_id: &str, d: &LoginDefaults) -> LoginSpec {
        let mut env: Vec<String> = Vec::new();
        if !d.path_append.is_empty() {
            env.push(format!("PATH=${{PATH}}:{}", d.path_append.join(":")));
        }
        env.extend(d.env.iter().map(|(k, v)| format!("{k}={v}")));
        env.extend(self.env.iter().cloned());
        LoginSpec {
            session_id: session_id.into(),
            provider: name.into(),
            argv: self.command.clone(),
            env,
            flow: self.flow.clone(),
            answers: self.answers.clone(),
            credentials: self
                .credentials
                .iter()
                .map(|c| CredentialSpec {
                    path: c.path.clone(),
                    required: c.required.clone(),
                })
                .collect(),
            confirm: self.confirm.clone(),
            url_timeout_ms: d.url_timeout_ms,
            confirm_timeout_ms: d.confirm_timeout_ms,
            ca_env: self.ca_env.clone(),
            fail_when: self.fail_when.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/providers.toml")
    }

    #[test]
    fn shipped_profiles_load_and_demo_is_opt_in() {
        let off = Providers::load(&shipped(), false).unwrap();
        assert_eq!(off.names(), vec!["claude_code", "codex", "gemini_cli"]);
        let on = Providers::load(&shipped(), true).unwrap();
        assert!(on.get("demo").is_some());
    }

    #[test]
    fn login_spec_puts_config_env_before_the_profile() {
        let p = Providers::load(&shipped(), false).unwrap();
        let d = LoginDefaults {
            path_append: vec!["/fakes".into()],
            url_timeout_ms: 1,
            confirm_timeout_ms: 2,
            ..Default::default()
        };
        let spec = p.get("codex").unwrap().login_spec("codex", "s1", &d);
        assert_eq!(spec.env[0], "PATH=${PATH}:/fakes");
        assert!(spec.env.iter().any(|e| e.starts_with("CODEX_HOME=")));
        assert_eq!(spec.argv, vec!["codex", "login"]);
    }

    #[test]
    fn bad_profiles_are_refused_with_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[x]\ndisplay_name='X'\ncommand=['x']\nflow={type='loopback'}\nconfirm={type='file'}\n[[x.credentials]]\npath='/a'\ndeliver_to='relative'\n").unwrap();
        let e = Providers::load(&path, false).unwrap_err().to_string();
        assert!(e.contains("deliver_to must be an absolute path"), "{e}");
    }
}
