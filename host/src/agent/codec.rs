//! tokio-util codec over the shared frame format, for the host's side of an
//! agent connection ([`super::handshake`], [`super::client`]). Payloads are
//! returned raw so the caller decides how to parse and what a bad one costs.

use airlock_proto::frame::{self, HEADER_LEN};
use airlock_proto::{FrameError, HostMessage};
use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes were not a valid frame (too large, empty).
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Frames with a payload limit.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max: usize,
}

impl FrameCodec {
    /// A codec accepting payloads of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        let Some(header) = src.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(header);
        // Fails at the header of an oversized frame, before its payload is
        // buffered; the length reserved below is therefore bounded.
        let len = frame::parse_header(h, self.max)?;
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        Ok(Some(src.split_to(len).freeze()))
    }
}

impl Encoder<HostMessage> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: HostMessage, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.extend_from_slice(&frame::encode(&msg, self.max)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_header_is_rejected_without_buffering() {
        let mut codec = FrameCodec::new(100);
        let mut buf = BytesMut::from(&(1u32 << 30).to_be_bytes()[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::Frame(FrameError::TooLarge { .. }))
        ));
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn decodes_split_frames() {
        let mut codec = FrameCodec::new(100);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0, 0, 0, 2, b'{']);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"}");
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"{}");
    }
}
