//! A byte buffer that never shows its contents in `Debug` output and is
//! zeroed when dropped.
//!
//! File contents travel in [`crate::WriteFileRequest`] and
//! [`crate::FileContents`]; they carry credentials, so every message that
//! holds them can be logged with `{:?}` without leaking them, and a
//! credential does not linger in freed memory once its last copy goes.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroize;

/// Bytes whose `Debug` prints only their length; zeroed on drop.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Wraps bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The bytes, for the code that must use them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Unwraps the bytes (the caller then owns them, unzeroed).
    pub fn into_inner(mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        // The whole allocation, spare capacity included.
        self.0.zeroize();
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        crate::b64::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::b64::deserialize(d).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = SecretBytes::new(b"canary-token-123".to_vec());
        let shown = format!("{s:?}");
        assert!(!shown.contains("canary"), "{shown}");
        assert!(shown.contains("16 bytes"));
    }

    #[test]
    fn serialises_as_base64() {
        let s = SecretBytes::new(b"hi".to_vec());
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"aGk=\"");
        let back: SecretBytes = serde_json::from_str("\"aGk=\"").unwrap();
        assert_eq!(back.expose(), b"hi");
    }
}
