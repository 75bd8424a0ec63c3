//! The client side of the control protocol, for `ustad status` and the other commands.
//!
//! Blocking and simple: connect, write one request line, read reply lines.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::protocol::{Reply, Request};

/// A connection that has sent its request and reads the answer.
#[derive(Debug)]
pub struct Answer {
    reader: BufReader<UnixStream>,
    line: String,
    finished: bool,
}

/// Connects to the primary at `path` and sends `request`.
///
/// # Errors
/// When nothing listens there (with the path in the message), or the write fails.
pub fn send(path: &Path, request: &Request) -> io::Result<Answer> {
    let mut stream = UnixStream::connect(path).map_err(|error| {
        let hint = match error.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                "is ustad running? (`ustad status` lists what runs)"
            }
            io::ErrorKind::PermissionDenied => "it belongs to another user",
            _ => "",
        };
        io::Error::new(
            error.kind(),
            format!("cannot connect to {}: {error}; {hint}", path.display()),
        )
    })?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
    line.push(b'\n');
    if let Err(error) = stream.write_all(&line) {
        // A primary that refuses a client answers and closes at once; the answer is still
        // there to read.
        if error.kind() != io::ErrorKind::BrokenPipe {
            return Err(error);
        }
    }
    Ok(Answer {
        reader: BufReader::new(stream),
        line: String::new(),
        finished: false,
    })
}

impl Answer {
    /// Gives up on the next line after `timeout` (none: wait as long as it takes).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.reader.get_ref().set_read_timeout(timeout)
    }

    /// The next reply line; `None` once the final one was read or the primary hung up.
    ///
    /// # Errors
    /// A read error, or a line that is not a reply (with the line in the message).
    pub fn next_reply(&mut self) -> io::Result<Option<Reply>> {
        if self.finished {
            return Ok(None);
        }
        self.line.clear();
        if self.reader.read_line(&mut self.line)? == 0 {
            self.finished = true;
            return Ok(None);
        }
        let reply: Reply = serde_json::from_str(self.line.trim_end()).map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "unexpected answer from ustad ({error}): {}",
                    self.line.trim_end()
                ),
            )
        })?;
        self.finished = reply.is_final();
        Ok(Some(reply))
    }

    /// Reads up to the final reply, passing the others to `each`.
    ///
    /// # Errors
    /// As [`Answer::next_reply`], and when the primary hangs up before a final reply.
    pub fn finish(mut self, mut each: impl FnMut(Reply)) -> io::Result<Reply> {
        while let Some(reply) = self.next_reply()? {
            if reply.is_final() {
                return Ok(reply);
            }
            each(reply);
        }
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "ustad closed the connection without an answer",
        ))
    }
}
