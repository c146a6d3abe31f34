//! Extra certificate authorities for a browser VM: test configurations
//! point the vendors' host names at stand-ins whose certificates a test CA
//! signed (airlockd's `auth.extra_ca_file`). Chromium learns the CA from its
//! `CACertificates` policy, written before it starts; login CLIs from the
//! file the environment variables of their profile (`ca_env`) name.
//! Called by [`super::BrowserRole::start`]; production never sends a CA.

use std::path::{Path, PathBuf};

/// Largest PEM bundle accepted.
const MAX_PEM_BYTES: usize = 64 << 10;
/// Chromium's managed policy directory (Debian's Chromium reads it).
pub const POLICY_DIR: &str = "/etc/chromium/policies/managed";

/// The certificates of a PEM bundle, each as the base64 of its DER (the
/// text between the armour lines), which is what the policy takes.
pub fn pem_certificates(pem: &str) -> Result<Vec<String>, String> {
    if pem.len() > MAX_PEM_BYTES {
        return Err(format!("the extra CA bundle is over {MAX_PEM_BYTES} bytes"));
    }
    let mut certs = Vec::new();
    let mut current: Option<String> = None;
    for line in pem.lines().map(str::trim) {
        match (line, current.as_mut()) {
            ("-----BEGIN CERTIFICATE-----", None) => current = Some(String::new()),
            ("-----END CERTIFICATE-----", Some(_)) => certs.extend(current.take()),
            (l, Some(body))
                if l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)) =>
            {
                body.push_str(l)
            }
            (_, Some(_)) => return Err("the extra CA bundle has a malformed certificate".into()),
            (_, None) => {}
        }
    }
    if current.is_some() || certs.is_empty() || certs.iter().any(String::is_empty) {
        return Err("the extra CA bundle holds no complete PEM certificate".into());
    }
    Ok(certs)
}

/// Writes the bundle where logins read it (`dir/extra-ca.pem`, readable by
/// the login's user) and, when `policy_dir` is given, Chromium's policy.
pub fn install(pem: &str, dir: &Path, policy_dir: Option<&Path>) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let certs = pem_certificates(pem)?;
    let io = |what: &str, e: std::io::Error| format!("cannot write {what}: {e}");
    std::fs::create_dir_all(dir).map_err(|e| io("the CA directory", e))?;
    let path = dir.join("extra-ca.pem");
    std::fs::write(&path, pem).map_err(|e| io("the CA file", e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| io("the CA file", e))?;
    if let Some(policy_dir) = policy_dir {
        std::fs::create_dir_all(policy_dir).map_err(|e| io("the policy directory", e))?;
        let policy = serde_json::json!({ "CACertificates": certs });
        std::fs::write(policy_dir.join("airlock-extra-ca.json"), policy.to_string())
            .map_err(|e| io("the Chromium policy", e))?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\nAAAA\n-----END CERTIFICATE-----\n";

    #[test]
    fn certificates_are_read_from_the_armour() {
        assert_eq!(pem_certificates(PEM).unwrap(), vec!["MIIBAAAA".to_string()]);
        let two = format!("{PEM}junk between\n{PEM}");
        assert_eq!(pem_certificates(&two).unwrap().len(), 2);
    }

    #[test]
    fn malformed_bundles_are_refused() {
        assert!(pem_certificates("").is_err());
        assert!(pem_certificates("-----BEGIN CERTIFICATE-----\nMIIB\n").is_err());
        assert!(
            pem_certificates("-----BEGIN CERTIFICATE-----\nMI IB\n-----END CERTIFICATE-----")
                .is_err()
        );
        assert!(pem_certificates(&"A".repeat(MAX_PEM_BYTES + 1)).is_err());
    }

    #[test]
    fn install_writes_the_file_and_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = install(PEM, &dir.path().join("ca"), Some(&dir.path().join("pol"))).unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), PEM);
        let policy = std::fs::read_to_string(dir.path().join("pol/airlock-extra-ca.json")).unwrap();
        assert_eq!(policy, r#"{"CACertificates":["MIIBAAAA"]}"#);
    }
}
