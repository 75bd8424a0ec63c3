//! Length-prefixed frames over a byte stream.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use ustad_proto::ipc::HEADER;

/// Why a channel was cut.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading failed.
    #[error("reading the channel failed: {0}")]
    Io(#[from] std::io::Error),
    /// A frame announced a body longer than allowed.
    #[error("a frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame announced an empty body.
    #[error("a frame of length 0 (every frame holds one JSON object)")]
    Empty,
    /// The stream ended in the middle of a frame.
    #[error("the channel closed in the middle of a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        have: usize,
        /// Bytes announced (with the header).
        want: usize,
    },
    /// A frame's body is not an envelope.
    #[error("a frame is not a valid envelope: {0}")]
    Envelope(String),
}

/// A frame: the header, then `body`.
pub fn frame(body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out.freeze()
}

/// Reads frames from a stream into a reused buffer.
#[derive(Debug)]
pub struct FrameReader<R> {
    reader: R,
    buffer: BytesMut,
    max: usize,
    /// Frames split since the last read.
    since_read: usize,
    /// The last frame returned came alone: its read brought nothing else.
    lone: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Frames of at most `max` bytes of body.
    pub fn new(reader: R, max: usize) -> Self {
        FrameReader {
            reader,
            buffer: BytesMut::with_capacity(64 * 1024),
            max,
            since_read: 0,
            lone: false,
        }
    }

    /// Whether the last frame returned came alone, the one frame of its read: the peer is
    /// not streaming (see `Outbox::heard`).
    pub fn lone(&self) -> bool {
        self.lone
    }

    /// The next frame's body; `None` at a clean end of the stream.
    ///
    /// # Errors
    /// A read error, or a frame that breaks the protocol (see [`FrameError`]).
    pub async fn next(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(body) = self.split()? {
                self.since_read += 1;
                self.lone = self.since_read == 1 && self.buffer.is_empty();
                return Ok(Some(body));
            }
            if self.buffer.capacity() - self.buffer.len() < 4096 {
                self.buffer.reserve(64 * 1024);
            }
            let read = self.reader.read_buf(&mut self.buffer).await?;
            self.since_read = 0;
            if read == 0 {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                let want = match self.buffer.first_chunk::<HEADER>() {
                    Some(header) => HEADER + u32::from_le_bytes(*header) as usize,
                    None => HEADER,
                };
                return Err(FrameError::Truncated {
                    have: self.buffer.len(),
                    want,
                });
            }
        }
    }

    /// A complete frame at the front of the buffer, if there is one.
    fn split(&mut self) -> Result<Option<Bytes>, FrameError> {
        let Some(header) = self.buffer.first_chunk::<HEADER>() else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(*header) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max {
            return Err(FrameError::TooLong { len, max: self.max });
        }
        if self.buffer.len() < HEADER + len {
            self.buffer.reserve(HEADER + len - self.buffer.len());
            return Ok(None);
        }
        self.buffer.advance(HEADER);
        Ok(Some(self.buffer.split_to(len).freeze()))
    }

    /// Frames already buffered, without waiting for more.
    pub fn try_next(&mut self) -> Result<Option<Bytes>, FrameError> {
        self.split()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(input: &[u8], max: usize) -> (Vec<Bytes>, Option<FrameError>) {
        let mut reader = FrameReader::new(input, max);
        let mut frames = Vec::new();
        loop {
            match reader.next().await {
                Ok(Some(body)) => frames.push(body),
                Ok(None) => return (frames, None),
                Err(error) => return (frames, Some(error)),
            }
        }
    }

    #[tokio::test]
    async fn frames_round_trip_one_after_another() {
        let mut input = frame(b"{\"t\":\"ready\"}").to_vec();
        input.extend_from_slice(&frame(b"{}"));
        let (frames, error) = read_all(&input, 100).await;
        assert!(error.is_none());
        assert_eq!(frames, [&b"{\"t\":\"ready\"}"[..], &b"{}"[..]]);
    }

    #[tokio::test]
    async fn oversized_empty_and_truncated_frames_are_errors() {
        let (_, error) = read_all(&frame(&[b'x'; 101]), 100).await;
        assert!(matches!(
            error,
            Some(FrameError::TooLong { len: 101, max: 100 })
        ));
        // A huge announced length is refused from the header alone, before any allocation.
        let (_, error) = read_all(&u32::MAX.to_le_bytes(), 100).await;
        assert!(matches!(error, Some(FrameError::TooLong { .. })));
        let (_, error) = read_all(&0u32.to_le_bytes(), 100).await;
        assert!(matches!(error, Some(FrameError::Empty)));
        let input = frame(b"{\"t\":\"ready\"}");
        let (_, error) = read_all(&input[..input.len() - 2], 100).await;
        assert!(matches!(
            error,
            Some(FrameError::Truncated { have: 15, want: 17 })
        ));
        let (_, error) = read_all(&[1, 0], 100).await;
        assert!(matches!(
            error,
            Some(FrameError::Truncated { have: 2, want: 4 })
        ));
    }
}
