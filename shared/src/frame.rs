//! Frame codec: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! Used by the host's agent connection and by the agent's channel. Both read
//! a stream in whatever chunks the socket gives and feed them to a
//! [`FrameDecoder`], which never buffers more than one maximum-size frame:
//! a header that announces a larger frame is an error the moment its four
//! bytes arrive, before any payload is read.

use serde::{de::DeserializeOwned, Serialize};

use crate::limits::MAX_FRAME_BYTES_CEILING;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header announced (or the encoder produced) more than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Payload length announced or produced.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A header announced a zero-length payload, which no message encodes to.
    #[error("empty frame")]
    Empty,
    /// The payload is not a valid message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The message could not be serialised (a bug on the sending side).
    #[error("cannot encode message: {0}")]
    Encode(#[source] serde_json::Error),
    /// An earlier header was bad, so the stream is out of sync.
    #[error("stream out of sync after an earlier frame error")]
    Poisoned,
}

/// Serialises `msg` into one frame (header + payload).
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut out, msg).map_err(FrameError::Encode)?;
    let len = out.len() - HEADER_LEN;
    if len > max.min(MAX_FRAME_BYTES_CEILING) {
        return Err(FrameError::TooLarge { len, max });
    }
    // The ceiling is far below u32::MAX, so the cast cannot truncate.
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Parses a frame header and checks the announced length against `max`.
pub fn parse_header(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    let max = max.min(MAX_FRAME_BYTES_CEILING);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Deserialises one frame payload.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(FrameError::Malformed)
}

/// Incremental decoder: push bytes as they arrive, pop whole payloads.
///
/// After an error the stream is out of sync and the connection must be
/// closed; the decoder keeps returning the error.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
    /// Payload length of the frame being assembled, once its header is in.
    pending: Option<usize>,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder that accepts payloads of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max: max.min(MAX_FRAME_BYTES_CEILING),
            pending: None,
            failed: false,
        }
    }

    /// The payload limit in force.
    pub fn max(&self) -> usize {
        self.max
    }

    /// How many more bytes the decoder can take before it must be drained
    /// with [`FrameDecoder::next_payload`]. Readers size their reads by this,
    /// so the buffer never grows past one header plus one maximum payload.
    pub fn wants(&self) -> usize {
        let need = HEADER_LEN + self.pending.unwrap_or(0);
        need.saturating_sub(self.buf.len()).max(1)
    }

    /// Appends bytes read from the stream (ignored once the decoder has
    /// failed: nothing after a bad header can be trusted).
    pub fn push(&mut self, data: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(data);
        }
    }

    /// Bytes buffered but not yet returned as a payload.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Pops the next complete payload, if one is buffered.
    pub fn next_payload(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.failed {
            return Err(FrameError::Poisoned);
        }
        let len = match self.pending {
            Some(len) => len,
            None => {
                if self.buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                let mut header = [0u8; HEADER_LEN];
                header.copy_from_slice(&self.buf[..HEADER_LEN]);
                match parse_header(header, self.max) {
                    Ok(len) => {
                        self.pending = Some(len);
                        len
                    }
                    Err(e) => {
                        self.failed = true;
                        self.buf = Vec::new();
                        return Err(e);
                    }
                }
            }
        };
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let rest = self.buf.split_off(HEADER_LEN + len);
        let mut frame = std::mem::replace(&mut self.buf, rest);
        frame.drain(..HEADER_LEN);
        self.pending = None;
        Ok(Some(frame))
    }

    /// Pops and deserialises the next complete message, if one is buffered.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_payload()? {
            Some(payload) => decode_payload(&payload).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_in_one_byte_chunks() {
        let a = encode(&serde_json::json!({"a": 1}), 1024).unwrap();
        let b = encode(&serde_json::json!(["x", "y"]), 1024).unwrap();
        let mut dec = FrameDecoder::new(1024);
        let mut out = Vec::new();
        for byte in a.iter().chain(b.iter()) {
            dec.push(std::slice::from_ref(byte));
            while let Some(v) = dec.next_message::<serde_json::Value>().unwrap() {
                out.push(v);
            }
        }
        assert_eq!(
            out,
            vec![serde_json::json!({"a": 1}), serde_json::json!(["x", "y"])]
        );
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn oversized_header_fails_before_payload_arrives() {
        let mut dec = FrameDecoder::new(16);
        dec.push(&17u32.to_be_bytes());
        assert!(matches!(
            dec.next_payload(),
            Err(FrameError::TooLarge { len: 17, max: 16 })
        ));
        // The stream is out of sync: the decoder stays failed.
        dec.push(b"{}");
        assert!(matches!(dec.next_payload(), Err(FrameError::Poisoned)));
    }

    #[test]
    fn encoder_refuses_oversized_message() {
        let big = "x".repeat(100);
        assert!(matches!(encode(&big, 50), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn zero_length_frame_is_an_error() {
        let mut dec = FrameDecoder::new(16);
        dec.push(&[0, 0, 0, 0]);
        assert!(matches!(dec.next_payload(), Err(FrameError::Empty)));
    }

    #[test]
    fn wants_never_exceeds_one_frame() {
        let mut dec = FrameDecoder::new(100);
        assert_eq!(dec.wants(), HEADER_LEN);
        dec.push(&10u32.to_be_bytes());
        assert_eq!(dec.next_payload().unwrap(), None);
        assert_eq!(dec.wants(), 10);
    }
}
