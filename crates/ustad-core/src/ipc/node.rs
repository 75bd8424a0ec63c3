//! Node's IPC channel, for a pool of `ipc = "node"`: one JSON text per line, as Node writes and
//! reads it between a parent and a child of `child_process.fork` (its `json` serialization).
//! What a line means is `ustad_proto::node`'s: `"ready"`, `{"ustad": …}` requests, Node's own
//! `{"cmd": "NODE_…"}` (ignored), and everything else a message.
//!
//! Reading is bounded as for frames: a line longer than `max_message` breaks the channel
//! before more than that is buffered.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use ustad_proto::node;

use super::{Envelope, FrameError, Kind};

/// The line a worker gets before its stop signal: `"shutdown"`.
pub fn shutdown_line() -> Bytes {
    let mut line = BytesMut::new();
    encode(&mut line, node::SHUTDOWN).expect("a string encodes");
    line.freeze()
}

/// Appends `message` to `buffer` as one line of Node's channel.
///
/// # Errors
/// When `message` cannot be serialized.
pub fn encode<T: Serialize + ?Sized>(
    buffer: &mut BytesMut,
    message: &T,
) -> Result<(), serde_json::Error> {
    // serde_json escapes control characters in strings, so the text holds no newline.
    serde_json::to_writer(buffer.writer(), message)?;
    buffer.put_u8(b'\n');
    Ok(())
}

/// Reads lines from a stream into a reused buffer.
#[derive(Debug)]
pub struct LineReader<R> {
    reader: R,
    buffer: BytesMut,
    max: usize,
    /// How much of the buffer is known to hold no newline.
    scanned: usize,
    since_read: usize,
    lone: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// Lines of at most `max` bytes (without the newline).
    pub fn new(reader: R, max: usize) -> Self {
        LineReader {
            reader,
            buffer: BytesMut::with_capacity(16 * 1024),
            max,
            scanned: 0,
            since_read: 0,
            lone: false,
        }
    }

    /// Whether the last line returned came alone, the one line of its read.
    pub fn lone(&self) -> bool {
        self.lone
    }

    /// The next line, without its newline; `None` at a clean end of the stream.
    ///
    /// # Errors
    /// A read error, a line longer than the limit, or a stream that ends inside a line.
    pub async fn next(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(end) = self.buffer[self.scanned..].iter().position(|b| *b == b'\n') {
                let line = self.buffer.split_to(self.scanned + end + 1);
                self.scanned = 0;
                self.since_read += 1;
                self.lone = self.since_read == 1 && self.buffer.is_empty();
                let line = line.freeze();
                let len = line.len() - 1;
                if len > self.max {
                    return Err(FrameError::TooLong { len, max: self.max });
                }
                return Ok(Some(line.slice(..len)));
            }
            self.scanned = self.buffer.len();
            if self.scanned > self.max {
                return Err(FrameError::TooLong {
                    len: self.scanned,
                    max: self.max,
                });
            }
            if self.buffer.capacity() - self.buffer.len() < 4096 {
                self.buffer.reserve(16 * 1024);
            }
            let read = self.reader.read_buf(&mut self.buffer).await?;
            self.since_read = 0;
            if read == 0 {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                return Err(FrameError::Truncated {
                    have: self.buffer.len(),
                    want: self.buffer.len() + 1,
                });
            }
        }
    }
}

/// What an object a worker sends may say to ustad.
#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    ustad: Option<serde_json::Value>,
    #[serde(default)]
    cmd: Option<serde_json::Value>,
}

/// What a line from a worker means: an envelope, or `None` for Node's own messages.
///
/// # Errors
/// [`FrameError::Envelope`] when the line is not JSON, or asks ustad something it does not
/// know.
pub fn decode(line: Bytes) -> Result<Option<Envelope>, FrameError> {
    let invalid = |e: serde_json::Error| FrameError::Envelope(format!("not a JSON text: {e}"));
    let kind = match line.first() {
        Some(b'"') => {
            let text: String = serde_json::from_slice(&line).map_err(invalid)?;
            if text == node::READY {
                Kind::Ready
            } else {
                Kind::Msg
            }
        }
        Some(b'{') => {
            let probe: Probe = serde_json::from_slice(&line).map_err(invalid)?;
            let internal = probe
                .cmd
                .as_ref()
                .and_then(serde_json::Value::as_str)
                .is_some_and(|cmd| cmd.starts_with(node::INTERNAL_PREFIX));
            if internal {
                return Ok(None);
            }
            match probe.ustad {
                None => Kind::Msg,
                Some(request) => match request.as_str() {
                    Some(node::request::READY) => Kind::Ready,
                    Some(node::request::RESTART) => Kind::Restart,
                    Some(node::request::STOPPING) => Kind::Stopping,
                    Some(node::request::HEARTBEAT) => Kind::Heartbeat,
                    _ => {
                        return Err(FrameError::Envelope(format!(
                            "{{\"{}\": {request}}} is not a request ustad knows (\"{}\", \"{}\", \"{}\" or \"{}\")",
                            node::KEY,
                            node::request::READY,
                            node::request::RESTART,
                            node::request::STOPPING,
                            node::request::HEARTBEAT
                        )));
                    }
                },
            }
        }
        _ => {
            serde_json::from_slice::<serde::de::IgnoredAny>(&line).map_err(invalid)?;
            Kind::Msg
        }
    };
    Ok(Some(match kind {
        Kind::Msg => Envelope::whole(Kind::Msg, line),
        other => Envelope::whole(other, Bytes::new()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(line: &str) -> Result<Option<Kind>, FrameError> {
        decode(Bytes::copy_from_slice(line.as_bytes())).map(|e| e.map(|e| e.kind))
    }

    #[test]
    fn what_a_node_worker_says() {
        assert_eq!(kind("\"ready\"").unwrap(), Some(Kind::Ready));
        assert_eq!(kind("{\"ustad\":\"ready\"}").unwrap(), Some(Kind::Ready));
        assert_eq!(
            kind("{\"ustad\":\"restart\"}").unwrap(),
            Some(Kind::Restart)
        );
        assert_eq!(
            kind("{\"ustad\":\"stopping\"}").unwrap(),
            Some(Kind::Stopping)
        );
        assert_eq!(
            kind("{\"ustad\":\"heartbeat\"}").unwrap(),
            Some(Kind::Heartbeat)
        );
        assert_eq!(kind("{\"cmd\":\"NODE_HANDLE_ACK\"}").unwrap(), None);
        for message in [
            "\"hello\"",
            "{\"cmd\":\"mine\"}",
            "[1,2]",
            "42",
            "null",
            "{\"a\":{}}",
        ] {
            assert_eq!(kind(message).unwrap(), Some(Kind::Msg), "{message}");
        }
        let message = decode(Bytes::from_static(b"{\"n\": 1}")).unwrap().unwrap();
        assert_eq!(message.body(), Some(&b"{\"n\": 1}"[..]));
    }

    #[test]
    fn garbage_and_unknown_requests_are_errors() {
        for line in [
            "",
            "hello",
            "{\"n\":",
            "{\"ustad\":\"explode\"}",
            "\"unterminated",
        ] {
            assert!(
                matches!(kind(line), Err(FrameError::Envelope(_))),
                "{line:?}: {:?}",
                kind(line)
            );
        }
    }

    #[test]
    fn lines_are_json_texts_with_a_newline() {
        let mut buffer = BytesMut::new();
        encode(&mut buffer, &serde_json::json!({"text": "two\nlines"})).unwrap();
        assert_eq!(&buffer[..], b"{\"text\":\"two\\nlines\"}\n");
        assert_eq!(&shutdown_line()[..], b"\"shutdown\"\n");
    }

    async fn read_all(input: &[u8], max: usize) -> (Vec<Bytes>, Option<FrameError>) {
        let mut reader = LineReader::new(input, max);
        let mut lines = Vec::new();
        loop {
            match reader.next().await {
                Ok(Some(line)) => lines.push(line),
                Ok(None) => return (lines, None),
                Err(error) => return (lines, Some(error)),
            }
        }
    }

    #[tokio::test]
    async fn lines_are_split_bounded_and_a_cut_one_is_an_error() {
        let (lines, error) = read_all(b"\"a\"\n{\"b\":1}\n", 16).await;
        assert_eq!(lines, [&b"\"a\""[..], &b"{\"b\":1}"[..]]);
        assert!(error.is_none());
        let (lines, error) = read_all(b"\"a\"\n\"cut", 16).await;
        assert_eq!(lines.len(), 1);
        assert!(matches!(error, Some(FrameError::Truncated { .. })));
        let long = [b'x'; 100];
        let (_, error) = read_all(&long, 16).await;
        assert!(matches!(error, Some(FrameError::TooLong { .. })));
        let (_, error) = read_all(b"\"0123456789abcdefghij\"\n", 16).await;
        assert!(matches!(error, Some(FrameError::TooLong { .. })));
    }
}
