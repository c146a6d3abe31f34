//! Encrypted credential store (placeholder, being written).
