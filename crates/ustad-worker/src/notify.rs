//! Telling the supervisor how this worker is doing: the `sd_notify` protocol over the datagram
//! socket named by `NOTIFY_SOCKET`.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use ustad_proto::notify::{FLAG, READY, REQUEST_RESTART, STATUS, STOPPING, USTAD_REQUEST};

use crate::Error;
use crate::vars::NOTIFY_SOCKET;

/// Sends state changes to the supervisor.
///
/// Each message is one datagram of newline-separated `KEY=VALUE` lines, as in systemd's
/// `sd_notify(3)`. The supervisor understands `READY=1`, `STOPPING=1`, `STATUS=…` and ustad's
/// own `USTAD_REQUEST=restart`.
///
/// # Caveats
///
/// Sending blocks while the supervisor's receive queue is full (it drains it continuously, so
/// this is brief). The receiver learns the sender's pid from the kernel, so a notification sent
/// from a child process of the worker is attributed to that child, not to the worker.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier for the socket named by `NOTIFY_SOCKET`, or `None` when it is unset or empty
    /// (the worker runs without a supervisor).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEnv`] when `NOTIFY_SOCKET` is neither an absolute path nor `@name` (an
    /// abstract socket); [`Error::NotifySocket`] when the sending socket cannot be created.
    pub fn from_env() -> Result<Option<Notifier>, Error> {
        match parse_notify_socket(std::env::var_os(NOTIFY_SOCKET).as_deref())? {
            Some(addr) => Notifier::new(addr).map(Some),
            None => Ok(None),
        }
    }

    /// A notifier that sends to `addr`.
    ///
    /// # Errors
    ///
    /// [`Error::NotifySocket`] when the sending socket cannot be created.
    pub fn new(addr: SocketAddr) -> Result<Notifier, Error> {
        let socket = UnixDatagram::unbound().map_err(|source| Error::NotifySocket { source })?;
        Ok(Notifier { socket, addr })
    }

    /// Sends `state`, one or more newline-separated `KEY=VALUE` lines, as one datagram.
    ///
    /// # Errors
    ///
    /// The error from `sendto(2)`, e.g. `ConnectionRefused` when nobody listens there any more.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        Ok(())
    }

    /// Sends `READY=1`: the worker is listening and the supervisor may count it as serving.
    pub fn ready(&self) -> io::Result<()> {
        self.notify(&format!("{READY}={FLAG}"))
    }

    /// Sends `STOPPING=1`: the worker has stopped accepting and is draining.
    pub fn stopping(&self) -> io::Result<()> {
        self.notify(&format!("{STOPPING}={FLAG}"))
    }

    /// Sends `STATUS=<text>`, a one-line status shown by the supervisor. Newlines in `text`
    /// become spaces so that they cannot start a new `KEY=VALUE` line.
    pub fn status(&self, text: &str) -> io::Result<()> {
        self.notify(&format!("{STATUS}={}", one_line(text)))
    }

    /// Sends `USTAD_REQUEST=restart`: asks the supervisor to start a replacement for this worker
    /// and then stop this one the usual way (SIGTERM once the replacement is ready).
    pub fn request_restart(&self) -> io::Result<()> {
        self.notify(&format!("{USTAD_REQUEST}={REQUEST_RESTART}"))
    }
}

/// Sends `state` to the socket named by `NOTIFY_SOCKET`, if any.
///
/// Returns `Ok(false)` without doing anything when `NOTIFY_SOCKET` is unset or empty, so it is
/// cheap to call when running without a supervisor. Creates a socket per call; keep a
/// [`Notifier`] to send many messages.
///
/// # Errors
///
/// `InvalidInput` when `NOTIFY_SOCKET` is malformed; otherwise as [`Notifier::notify`].
pub fn notify(state: &str) -> io::Result<bool> {
    let notifier = Notifier::from_env().map_err(|err| match err {
        Error::NotifySocket { source } => source,
        other => io::Error::new(io::ErrorKind::InvalidInput, other),
    })?;
    match notifier {
        Some(notifier) => notifier.notify(state).map(|()| true),
        None => Ok(false),
    }
}

/// Reads a `NOTIFY_SOCKET` value: `/path` or `@abstract-name`; `None` when unset or empty.
pub(crate) fn parse_notify_socket(value: Option<&OsStr>) -> Result<Option<SocketAddr>, Error> {
    let Some(value) = value.filter(|value| !value.is_empty()) else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    let invalid = |reason: String| Error::invalid_env(NOTIFY_SOCKET, &text, reason);
    let addr = match value.as_bytes() {
        [b'@', name @ ..] if !name.is_empty() => SocketAddr::from_abstract_name(name),
        [b'/', ..] => SocketAddr::from_pathname(value),
        _ => {
            return Err(invalid(
                "expected an absolute path, or @name for an abstract socket".to_owned(),
            ));
        }
    };
    addr.map(Some).map_err(|err| invalid(err.to_string()))
}

fn one_line(text: &str) -> Cow<'_, str> {
    if text.contains(['\n', '\r']) {
        Cow::Owned(text.replace(['\n', '\r'], " "))
    } else {
        Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse(value: &str) -> Result<Option<SocketAddr>, Error> {
        parse_notify_socket(Some(OsStr::new(value)))
    }

    #[test]
    fn unset_or_empty_is_none() {
        assert!(parse_notify_socket(None).unwrap().is_none());
        assert!(parse("").unwrap().is_none());
    }

    #[test]
    fn path_and_abstract_forms() {
        let addr = parse("/run/ustad/notify.sock").unwrap().unwrap();
        assert_eq!(
            addr.as_pathname(),
            Some(std::path::Path::new("/run/ustad/notify.sock"))
        );
        let addr = parse("@ustad/notify").unwrap().unwrap();
        assert_eq!(addr.as_abstract_name(), Some(&b"ustad/notify"[..]));
    }

    #[test]
    fn garbage_names_the_variable() {
        for value in ["relative.sock", "@", "vsock:2:1234"] {
            match parse(value) {
                Err(Error::InvalidEnv { var, .. }) => assert_eq!(var, NOTIFY_SOCKET),
                other => panic!("{value:?}: expected InvalidEnv, got {other:?}"),
            }
        }
        let too_long = format!("/{}", "x".repeat(200));
        assert!(matches!(parse(&too_long), Err(Error::InvalidEnv { .. })));
    }

    fn receiver() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (dir, path, socket)
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_real_datagrams() {
        let (_dir, path, socket) = receiver();
        let notifier = Notifier::new(SocketAddr::from_pathname(&path).unwrap()).unwrap();
        notifier.ready().unwrap();
        notifier.status("warming\nup").unwrap();
        notifier.request_restart().unwrap();
        notifier.stopping().unwrap();
        notifier.notify("STATUS=a\nX_CUSTOM=1").unwrap();
        assert_eq!(recv(&socket), "READY=1");
        assert_eq!(recv(&socket), "STATUS=warming up");
        assert_eq!(recv(&socket), "USTAD_REQUEST=restart");
        assert_eq!(recv(&socket), "STOPPING=1");
        assert_eq!(recv(&socket), "STATUS=a\nX_CUSTOM=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("ustad-worker-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let parsed = parse(&format!("@{name}")).unwrap().unwrap();
        Notifier::new(parsed).unwrap().ready().unwrap();
        assert_eq!(recv(&socket), "READY=1");
    }

    #[test]
    fn nobody_listening_is_an_error() {
        let (_dir, path, socket) = receiver();
        drop(socket);
        let notifier = Notifier::new(SocketAddr::from_pathname(&path).unwrap()).unwrap();
        assert!(notifier.ready().is_err());
    }
}
