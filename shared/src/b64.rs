//! Serde helpers that carry byte strings as standard base64 in JSON.
//!
//! Used through `#[serde(with = "crate::b64")]` on message fields that hold
//! file contents or process output.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use serde::{Deserialize, Deserializer, Serializer};

/// Serialises bytes as a base64 string.
pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&STANDARD.encode(bytes))
}

/// Deserialises a base64 string into bytes.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    STANDARD
        .decode(text.as_bytes())
        .map_err(serde::de::Error::custom)
}

/// Encodes bytes as base64 (for callers that build JSON by hand).
pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}
