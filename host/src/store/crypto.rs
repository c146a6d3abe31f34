//! Sealing and opening credential records with AES-256-GCM, for
//! [`super::CredentialStore`]; and [`Scrubbed`], the buffer type that
//! zeroes plaintext and key text when dropped, also used by `keys`.
//!
//! Each record gets a fresh random 96-bit nonce. Random nonces are safe for
//! far more records than a credential store will hold under one key (the
//! usual bound is 2^32 messages per key); rotate keys long before that.
//! The associated data binds a ciphertext to its row: record id, user,
//! provider and key id, each length-prefixed so no two different tuples
//! encode alike. A ciphertext copied to another row, or relabelled with
//! another key id, therefore fails authentication instead of decrypting.

use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use super::{CredentialBundle, StoreError};

/// Version tag in front of the associated data, so that a later format
/// cannot be confused with this one.
const AAD_DOMAIN: &[u8] = b"airlock.credential-record.v1";

/// Room for JSON punctuation, the mode and field names of one file.
const JSON_OVERHEAD_PER_FILE: usize = 64;

/// A byte buffer for secrets this module owns: zeroed (its whole capacity)
/// when dropped, and `Debug` shows only its length.
pub(crate) struct Scrubbed(Vec<u8>);

impl Scrubbed {
    /// An empty buffer that can grow to `capacity` without reallocating
    /// (a reallocation would leave an unscrubbed copy behind).
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }

    /// `len` zero bytes.
    pub(crate) fn zeroed(len: usize) -> Self {
        Self(vec![0; len])
    }

    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, writable.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// The vector, for writers that append.
    pub(crate) fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    /// Appends bytes.
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
}

impl Drop for Scrubbed {
    fn drop(&mut self) {
        // Zero the spare capacity too: data may have been truncated away.
        let capacity = self.0.capacity();
        self.0.resize(capacity, 0);
        self.0.fill(0);
        // Keeps the compiler from treating the writes as dead stores.
        std::hint::black_box(&mut self.0);
    }
}

impl fmt::Debug for Scrubbed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubbed(<{} bytes redacted>)", self.0.len())
    }
}

/// What is stored for one record besides its metadata.
pub(crate) struct Sealed {
    /// The 96-bit nonce.
    pub(crate) nonce: Vec<u8>,
    /// Ciphertext followed by the 16-byte tag.
    pub(crate) ciphertext: Vec<u8>,
}

/// The associated data of a record.
pub(crate) fn associated_data(
    record_id: &str,
    user_id: &str,
    provider: &str,
    key_id: &str,
) -> Vec<u8> {
    let fields = [record_id, user_id, provider, key_id];
    let len = AAD_DOMAIN.len() + fields.iter().map(|f| 8 + f.len()).sum::<usize>();
    let mut aad = Vec::with_capacity(len);
    aad.extend_from_slice(AAD_DOMAIN);
    for field in fields {
        // u64 lengths: no field length can overflow the prefix.
        aad.extend_from_slice(&(field.len() as u64).to_be_bytes());
        aad.extend_from_slice(field.as_bytes());
    }
    aad
}

/// Encrypts the JSON of `bundle` under `key` with a fresh random nonce.
pub(crate) fn seal(
    key: &LessSafeKey,
    rng: &SystemRandom,
    aad: &[u8],
    bundle: &CredentialBundle,
) -> Result<Sealed, StoreError> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce)
        .map_err(|_| StoreError::Encrypt("the system random number generator failed"))?;
    let mut buf = Scrubbed::with_capacity(plaintext_capacity(bundle, key));
    serde_json::to_writer(buf.vec_mut(), bundle)
        .map_err(|_| StoreError::Encrypt("the bundle cannot be serialised"))?;
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        buf.vec_mut(),
    )
    .map_err(|_| StoreError::Encrypt("AES-GCM sealing failed"))?;
    // The buffer now holds ciphertext; copying it out leaves no plaintext.
    Ok(Sealed {
        nonce: nonce.to_vec(),
        ciphertext: buf.as_slice().to_vec(),
    })
}

/// Authenticates and decrypts a record. Any mismatch (key, nonce,
/// ciphertext, tag or associated data) is `Decrypt`; the caller never sees
/// unauthenticated bytes.
pub(crate) fn open(
    key: &LessSafeKey,
    record_id: &str,
    nonce: &[u8],
    ciphertext: Vec<u8>,
    aad: &[u8],
) -> Result<CredentialBundle, StoreError> {
    let decrypt_err = || StoreError::Decrypt {
        record_id: record_id.to_string(),
    };
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| decrypt_err())?;
    // Decryption happens in place: the buffer holds plaintext afterwards
    // and is scrubbed when it goes out of scope.
    let mut buf = Scrubbed(ciphertext);
    let plain = key
        .open_in_place(nonce, Aad::from(aad), buf.as_mut_slice())
        .map_err(|_| decrypt_err())?;
    // The parser's message is dropped: it can quote the plaintext.
    serde_json::from_slice(plain).map_err(|_| StoreError::Corrupt {
        record_id: record_id.to_string(),
    })
}

/// An upper bound of the JSON length of `bundle` plus the tag, so that
/// serialising and sealing never reallocate the plaintext buffer.
fn plaintext_capacity(bundle: &CredentialBundle, key: &LessSafeKey) -> usize {
    let files: usize = bundle
        .files
        .iter()
        // Paths may need `\uXXXX` escapes (6 bytes per input byte at most);
        // contents are base64 (4 bytes per 3).
        .map(|f| JSON_OVERHEAD_PER_FILE + f.path.len() * 6 + f.contents.len().div_ceil(3) * 4)
        .sum();
    JSON_OVERHEAD_PER_FILE + files + key.algorithm().tag_len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CredentialFile;
    use ring::aead::{UnboundKey, AES_256_GCM};

    fn key(byte: u8) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[byte; 32]).unwrap())
    }

    fn bundle() -> CredentialBundle {
        CredentialBundle {
            files: vec![CredentialFile {
                path: ".codex/auth.json".into(),
                mode: 0o600,
                contents: b"{\"token\":\"canary\"}".to_vec().into(),
            }],
        }
    }

    #[test]
    fn associated_data_is_unambiguous() {
        let a = associated_data("r", "ab", "c", "k");
        let b = associated_data("r", "a", "bc", "k");
        assert_ne!(a, b);
    }

    #[test]
    fn open_reverses_seal_and_rejects_other_aad() {
        let rng = SystemRandom::new();
        let aad = associated_data("r", "u", "p", "k");
        let sealed = seal(&key(1), &rng, &aad, &bundle()).unwrap();
        let back = open(&key(1), "r", &sealed.nonce, sealed.ciphertext.clone(), &aad).unwrap();
        assert_eq!(back.files[0].contents, bundle().files[0].contents);
        let other = associated_data("r", "u", "q", "k");
        let err = open(
            &key(1),
            "r",
            &sealed.nonce,
            sealed.ciphertext.clone(),
            &other,
        );
        assert!(matches!(err, Err(StoreError::Decrypt { .. })));
        let err = open(&key(2), "r", &sealed.nonce, sealed.ciphertext, &aad);
        assert!(matches!(err, Err(StoreError::Decrypt { .. })));
    }

    #[test]
    fn capacity_bound_holds_for_awkward_paths() {
        let mut b = bundle();
        b.files[0].path = "\u{1}\u{2}\"\\".repeat(10);
        let mut buf = Vec::new();
        serde_json::to_writer(&mut buf, &b).unwrap();
        assert!(buf.len() + 16 <= plaintext_capacity(&b, &key(1)));
    }
}
