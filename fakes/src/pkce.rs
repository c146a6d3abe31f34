//! PKCE (RFC 7636, `S256` only) and random-string helpers. The fake
//! authorization server verifies with these; the demo CLI generates with
//! them, so both sides agree on the encoding by construction.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// A code verifier and its `S256` challenge.
#[derive(Clone)]
pub struct PkcePair {
    /// The secret the client keeps and sends to the token endpoint.
    pub verifier: String,
    /// `BASE64URL(SHA256(verifier))`, sent in the authorization request.
    pub challenge: String,
}

impl std::fmt::Debug for PkcePair {
    // The verifier is a secret: show only its length.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PkcePair")
            .field("verifier_len", &self.verifier.len())
            .field("challenge", &self.challenge)
            .finish()
    }
}

/// `n` random bytes, base64url-encoded without padding.
pub fn random_urlsafe(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A fresh verifier (64 random bytes, as Codex's `pkce.rs` uses) and its
/// challenge.
pub fn generate() -> PkcePair {
    let verifier = random_urlsafe(64);
    let challenge = challenge_s256(&verifier);
    PkcePair {
        verifier,
        challenge,
    }
}

/// `BASE64URL-ENCODE(SHA256(ASCII(verifier)))` (RFC 7636 §4.2).
pub fn challenge_s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// Whether `verifier` has the form RFC 7636 §4.1 requires: 43 to 128
/// characters from the unreserved set.
pub fn is_valid_verifier(verifier: &str) -> bool {
    (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// Whether `verifier` is well formed and hashes to `challenge`.
pub fn verify_s256(verifier: &str, challenge: &str) -> bool {
    if !is_valid_verifier(verifier) {
        return false;
    }
    let computed = challenge_s256(verifier);
    // Compare without an early exit so timing does not reveal a prefix.
    computed.len() == challenge.len()
        && computed
            .bytes()
            .zip(challenge.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    // The worked example of RFC 7636 Appendix B.
    const RFC_VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const RFC_CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    #[test]
    fn s256_matches_the_rfc_example() {
        assert_eq!(challenge_s256(RFC_VERIFIER), RFC_CHALLENGE);
        assert!(verify_s256(RFC_VERIFIER, RFC_CHALLENGE));
    }

    #[test]
    fn a_different_verifier_does_not_verify() {
        let other = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXK";
        assert!(!verify_s256(other, RFC_CHALLENGE));
    }

    #[test]
    fn the_plain_method_is_not_accepted() {
        // A client sending the verifier itself as the challenge ("plain").
        assert!(!verify_s256(RFC_VERIFIER, RFC_VERIFIER));
    }

    #[test]
    fn malformed_verifiers_are_rejected_even_if_they_hash_right() {
        let short = "abc";
        assert!(!verify_s256(short, &challenge_s256(short)));
        let bad_chars = "a".repeat(42) + "+";
        assert!(!verify_s256(&bad_chars, &challenge_s256(&bad_chars)));
    }

    #[test]
    fn generated_pairs_verify_and_differ() {
        let a = generate();
        let b = generate();
        assert!(verify_s256(&a.verifier, &a.challenge));
        assert!(is_valid_verifier(&a.verifier));
        assert_ne!(a.verifier, b.verifier);
    }
}
