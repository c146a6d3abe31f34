//! Reading and writing protocol frames on an async byte stream, for the
//! agent's connection to the host ([`crate::channel`]).

use airlock_proto::{frame, FrameDecoder, FrameError};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A frame could not be moved over the stream.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes were not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads the next frame's payload; `None` at a clean end of stream.
/// Cancel-safe: partial frames stay in `dec`.
pub async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<Option<Vec<u8>>, WireError> {
    loop {
        if let Some(payload) = dec.next_payload()? {
            return Ok(Some(payload));
        }
        let want = dec.wants().min(buf.len());
        let n = r.read(&mut buf[..want]).await?;
        if n == 0 {
            if dec.buffered() > 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            return Ok(None);
        }
        dec.push(&buf[..n]);
    }
}

/// Encodes and writes one message.
pub async fn write_message<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
    max: usize,
) -> Result<(), WireError> {
    let bytes = frame::encode(msg, max)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}
