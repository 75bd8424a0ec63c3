//! The receiving side of sd_notify: the `NOTIFY_SOCKET` workers report readiness and status to.
//!
//! One datagram socket serves every worker. The kernel stamps each datagram with the sender's
//! credentials (`SO_PASSCRED`), so a datagram is attributed to a worker by the pid that sent
//! it, never by anything it says: a worker cannot mark another one ready. The socket lives in
//! a private directory (mode 0700) under `$XDG_RUNTIME_DIR` or the temp dir.
//!
//! Nothing a worker sends can hurt the primary: a datagram is read into a fixed buffer
//! (oversized ones are truncated by the kernel and rejected), file descriptors passed along are
//! closed at once, and anything that is not `KEY=VALUE` lines of UTF-8 is rejected whole.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use rustix::net::sockopt;
use tokio::io::Interest;
use ustad_proto::notify as sd;

use crate::plan::WorkerMessage;

/// The largest datagram accepted, as systemd's `NOTIFY_BUFFER_MAX`.
pub const MAX_DATAGRAM: usize = 4096;

/// One datagram, as received.
#[derive(Debug)]
pub struct Datagram {
    /// The sender's pid, from the kernel (absent if credentials were not passed, or the sender
    /// is outside the primary's pid namespace).
    pub pid: Option<u32>,
    /// What it said, or why it was rejected.
    pub content: Result<Vec<WorkerMessage>, String>,
}

/// The primary's notify socket.
#[derive(Debug)]
pub struct NotifySocket {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
    /// Its private directory, removed with the socket on drop.
    dir: PathBuf,
}

/// A [`NotifySocket`] as numbers, for an upgrade's handover document.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HandedNotify {
    fd: std::os::fd::RawFd,
    path: PathBuf,
    dir: PathBuf,
}

impl NotifySocket {
    /// Binds a fresh socket in a private directory. Must be called within a tokio runtime.
    pub fn bind() -> io::Result<NotifySocket> {
        // Root's runtime directory is its own (0700): a pool that runs as another user could
        // not reach a socket there, so root's goes in the temporary directory.
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|dir| dir.is_dir() && dir.as_os_str().len() < 60)
            .filter(|_| !crate::accounts::can_switch_users())
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("ustad-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(base)?;
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path)?;
        let dir = dir.keep();
        socket.set_nonblocking(true)?;
        sockopt::set_socket_passcred(&socket, true)?;
        Ok(NotifySocket {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            path,
            dir,
        })
    }

    /// Lets workers that run as other users reach the socket: its directory searchable (not
    /// listable) by all, the socket writable by all. Who sent a datagram is still checked by
    /// the kernel's credentials, so nothing but a worker is heard.
    ///
    /// # Errors
    /// When the permissions cannot be changed.
    pub fn open_to_other_users(&self) -> io::Result<()> {
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o711))?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o666))
    }

    /// The path to give workers as `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What to remove should the primary die without dropping this: the socket, then its
    /// directory.
    pub fn paths(&self) -> [PathBuf; 2] {
        [self.path.clone(), self.dir.clone()]
    }

    /// Describes the socket, marking it to survive the exec.
    ///
    /// # Errors
    /// When its flags cannot be changed.
    pub fn hand_over(&self, keep: &mut crate::handover::Keep) -> io::Result<HandedNotify> {
        Ok(HandedNotify {
            fd: keep.fd(self.socket.as_fd())?,
            path: self.path.clone(),
            dir: self.dir.clone(),
        })
    }

    /// The socket `handed` describes. Must be called within a tokio runtime.
    ///
    /// # Errors
    /// When it was not handed over, or cannot be registered.
    pub fn take_over(
        handed: HandedNotify,
        fds: &mut crate::handover::HandedFds,
    ) -> io::Result<NotifySocket> {
        let socket = UnixDatagram::from(fds.get(handed.fd, "the notify socket")?);
        socket.set_nonblocking(true)?;
        Ok(NotifySocket {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            path: handed.path,
            dir: handed.dir,
        })
    }

    /// Waits for the next datagram.
    pub async fn recv(&self) -> io::Result<Datagram> {
        self.socket
            .async_io(Interest::READABLE, || receive(&self.socket))
            .await
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn receive(socket: impl AsFd) -> io::Result<Datagram> {
    let mut buffer = [0u8; MAX_DATAGRAM];
    let received = crate::sys::recv_datagram(socket.as_fd(), &mut buffer)?;
    let content = if received.truncated {
        Err(format!("datagram larger than {MAX_DATAGRAM} bytes"))
    } else if received.control_truncated || received.fds > 0 {
        Err("datagram carried file descriptors (FDSTORE is not supported); closed them".to_owned())
    } else {
        parse(&buffer[..received.len])
    };
    Ok(Datagram {
        pid: received.pid,
        content,
    })
}

/// Keys of the sd_notify protocol that ustad accepts and has no use for.
const IGNORED_KEYS: &[&str] = &[
    "MAINPID",
    sd::RELOADING,
    sd::MONOTONIC_USEC,
    "ERRNO",
    "BUSERROR",
    "EXIT_STATUS",
    // The key, not the variable: a new watchdog timeout, which ustad does not take from workers.
    "WATCHDOG_USEC",
    "EXTEND_TIMEOUT_USEC",
    "FDSTORE",
    "FDSTOREREMOVE",
    "FDNAME",
    "FDPOLL",
    "BARRIER",
    "NOTIFYACCESS",
];

/// Parses one datagram: `KEY=VALUE` lines. Unknown keys are ignored, as systemd does; anything
/// malformed rejects the whole datagram.
pub fn parse(bytes: &[u8]) -> Result<Vec<WorkerMessage>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "datagram is not UTF-8".to_owned())?;
    if text.trim().is_empty() {
        return Err("empty datagram".to_owned());
    }
    let mut messages = Vec::new();
    for (number, line) in text.split('\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "line {} is not KEY=VALUE: {:?}",
                number + 1,
                shorten(line)
            ));
        };
        let flag = |name: &str, message: WorkerMessage| {
            if value == sd::FLAG {
                Ok(Some(message))
            } else {
                Err(format!(
                    "{name} must be {}, got {:?}",
                    sd::FLAG,
                    shorten(value)
                ))
            }
        };
        let message = match key {
            sd::READY => flag(sd::READY, WorkerMessage::Ready)?,
            sd::STOPPING => flag(sd::STOPPING, WorkerMessage::Stopping)?,
            sd::STATUS => Some(WorkerMessage::Status(shorten(value))),
            sd::WATCHDOG if value == sd::FLAG => Some(WorkerMessage::Watchdog),
            // systemd's "the service hung, act now", used by apps that detect it themselves.
            sd::WATCHDOG if value == sd::WATCHDOG_TRIGGER => Some(WorkerMessage::WatchdogTrigger),
            sd::WATCHDOG => {
                return Err(format!(
                    "{} must be {} or {}, got {:?}",
                    sd::WATCHDOG,
                    sd::FLAG,
                    sd::WATCHDOG_TRIGGER,
                    shorten(value)
                ));
            }
            sd::USTAD_REQUEST if value == sd::REQUEST_RESTART => {
                Some(WorkerMessage::RequestRestart)
            }
            sd::USTAD_REQUEST => {
                return Err(format!(
                    "unknown {} {:?} (expected {:?})",
                    sd::USTAD_REQUEST,
                    shorten(value),
                    sd::REQUEST_RESTART
                ));
            }
            _ if IGNORED_KEYS.contains(&key) => None,
            _ if key.is_empty()
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') =>
            {
                return Err(format!(
                    "line {} has an invalid key {:?}",
                    number + 1,
                    shorten(key)
                ));
            }
            _ => None,
        };
        messages.extend(message);
    }
    Ok(messages)
}

/// Worker-supplied text is cut to a sane length before it reaches the log.
fn shorten(text: &str) -> String {
    const LIMIT: usize = 200;
    if text.len() <= LIMIT {
        return text.to_owned();
    }
    let mut end = LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::MaybeUninit;

    #[test]
    fn the_protocol_lines_ustad_understands() {
        assert_eq!(parse(b"READY=1"), Ok(vec![WorkerMessage::Ready]));
        assert_eq!(parse(b"WATCHDOG=1"), Ok(vec![WorkerMessage::Watchdog]));
        assert_eq!(
            parse(b"WATCHDOG=trigger"),
            Ok(vec![WorkerMessage::WatchdogTrigger])
        );
        assert!(parse(b"WATCHDOG=2").unwrap_err().contains("WATCHDOG"));
        assert_eq!(
            parse(b"READY=1\nSTATUS=serving 4 clients\nMAINPID=42\n"),
            Ok(vec![
                WorkerMessage::Ready,
                WorkerMessage::Status("serving 4 clients".into())
            ])
        );
        assert_eq!(parse(b"STOPPING=1"), Ok(vec![WorkerMessage::Stopping]));
        assert_eq!(
            parse(b"USTAD_REQUEST=restart"),
            Ok(vec![WorkerMessage::RequestRestart])
        );
        assert_eq!(parse(b"X_CUSTOM=1"), Ok(vec![]), "unknown keys are ignored");
        assert_eq!(
            parse(b"STATUS="),
            Ok(vec![WorkerMessage::Status(String::new())])
        );
    }

    #[test]
    fn garbage_is_rejected_whole() {
        assert!(parse(b"\xff\xfe").unwrap_err().contains("UTF-8"));
        assert!(parse(b"").unwrap_err().contains("empty"));
        assert!(
            parse(b"READY=1\nhello")
                .unwrap_err()
                .contains("line 2 is not KEY=VALUE")
        );
        assert!(parse(b"READY=yes").unwrap_err().contains("READY must be 1"));
        assert!(parse(b"USTAD_REQUEST=explode").is_err());
        assert!(parse(b"bad key=1").is_err());
        let long = format!("STATUS={}", "x".repeat(1000));
        let Ok(messages) = parse(long.as_bytes()) else {
            panic!()
        };
        let [WorkerMessage::Status(status)] = &messages[..] else {
            panic!()
        };
        assert!(status.len() < 210, "long status text is shortened");
    }

    #[tokio::test]
    async fn the_socket_lives_in_a_directory_only_its_owner_can_enter() {
        let socket = NotifySocket::bind().unwrap();
        let [path, dir] = socket.paths();
        assert_eq!(path.parent(), Some(dir.as_path()));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
        drop(socket);
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn datagrams_are_attributed_by_the_kernels_credentials() {
        let socket = NotifySocket::bind().unwrap();
        let sender = UnixDatagram::unbound().unwrap();
        sender.send_to(b"READY=1", socket.path()).unwrap();
        let datagram = socket.recv().await.unwrap();
        assert_eq!(datagram.pid, Some(std::process::id()));
        assert_eq!(datagram.content, Ok(vec![WorkerMessage::Ready]));

        sender
            .send_to(&vec![b'A'; MAX_DATAGRAM + 10], socket.path())
            .unwrap();
        let datagram = socket.recv().await.unwrap();
        assert!(datagram.content.unwrap_err().contains("larger than"));
    }

    #[tokio::test]
    async fn passed_file_descriptors_are_closed_and_the_datagram_rejected() {
        let socket = NotifySocket::bind().unwrap();
        let sender = UnixDatagram::unbound().unwrap();
        sender.connect(socket.path()).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let fds = [file.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(
            &sender,
            &[io::IoSlice::new(b"FDSTORE=1")],
            &mut control,
            rustix::net::SendFlags::empty(),
        )
        .unwrap();
        let open_before = std::fs::read_dir("/proc/self/fd").unwrap().count();
        let datagram = socket.recv().await.unwrap();
        assert!(datagram.content.unwrap_err().contains("file descriptors"));
        assert_eq!(datagram.pid, Some(std::process::id()));
        let open_after = std::fs::read_dir("/proc/self/fd").unwrap().count();
        assert_eq!(open_after, open_before, "the fd received was closed");
    }
}
