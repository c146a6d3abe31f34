//! The vendor sandbox's certificate authority: made fresh for each sandbox,
//! trusted only by test configurations (airlockd's `auth.extra_ca_file`,
//! which browser VMs give Chromium as a policy and the login CLIs through
//! the environment variables their profiles name). It signs one server
//! certificate for every vendor host name the sandbox answers.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The CA or its server certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen refused the parameters.
    #[error("cannot make the test certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the certificate or key.
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A throwaway CA and a server certificate for `hosts` it signed.
pub struct TestCa {
    ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// Validity: from a day back (clock skew between host and a VM) to 30
/// days on; browsers refuse server certificates valid for over 398 days.
fn validity(params: &mut CertificateParams) {
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(86_400)).into();
    params.not_after = (now + Duration::from_secs(30 * 86_400)).into();
}

impl TestCa {
    /// A new CA, and a server certificate for `hosts` (DNS names).
    pub fn new(hosts: &[String]) -> Result<Self, CaError> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name
            .push(DnType::CommonName, "airlock vendor sandbox CA (tests only)");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut ca);
        let ca_cert = ca.self_signed(&ca_key)?;

        let key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(hosts.to_vec())?;
        leaf.distinguished_name
            .push(DnType::CommonName, "airlock vendor sandbox");
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut leaf);
        let leaf_cert = leaf.signed_by(&key, &ca_cert, &ca_key)?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            chain: vec![leaf_cert.der().clone(), ca_cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    /// The CA certificate, PEM: what test configurations trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The server side: the certificate chain and its key, HTTP/1.1.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                self.chain.clone(),
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}
