//! Listening sockets inherited through systemd-style socket activation (`LISTEN_FDS`).

use std::ffi::OsStr;
use std::fmt;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use rustix::net::{AddressFamily, SocketType, sockopt};

use crate::sys::{self, TakeError};
use crate::vars::{LISTEN_FDNAMES, LISTEN_FDNAMES_SEPARATOR, LISTEN_FDS, LISTEN_PID, UNNAMED_FD};
use crate::{Error, env_str};

/// One listening socket inherited from the supervisor.
///
/// Turn it into a std listener with [`into_tcp_listener`](Self::into_tcp_listener) or
/// [`into_unix_listener`](Self::into_unix_listener), or take the raw [`OwnedFd`] with
/// [`into_owned_fd`](Self::into_owned_fd) for anything else.
#[derive(Debug)]
pub struct ListenFd {
    name: String,
    fd: OwnedFd,
}

/// Takes the listening sockets the supervisor passed to this process.
///
/// Follows systemd's `sd_listen_fds()` in its strict form: the sockets are fds `3..3 + n` with
/// `n = LISTEN_FDS`, and they are ours only if `LISTEN_PID` is this process's pid. Returns an
/// empty `Vec` when `LISTEN_FDS` or `LISTEN_PID` is unset, or when `LISTEN_PID` names another
/// process. Names come from `LISTEN_FDNAMES` (`"unknown"` when it is unset, as in systemd).
/// Each fd is marked close-on-exec so it does not leak into this worker's own children.
///
/// # Errors
///
/// [`Error::InvalidEnv`] naming the variable when one of them is not a number, or when
/// `LISTEN_FDNAMES` does not hold exactly `LISTEN_FDS` names; [`Error::MissingFd`] when a
/// promised fd is not open; [`Error::AlreadyTaken`] on a second successful call.
///
/// # Caveats
///
/// The environment is left as it is (changing it is not thread-safe). The variables are
/// harmless in a child this worker spawns: its pid differs from `LISTEN_PID`, so a strict reader
/// ignores them, and the fds themselves are close-on-exec. A relaxed reader that does not check
/// `LISTEN_PID` (such as the `listenfd` crate) would be misled; clear the variables in the
/// child's `Command` (`env_remove`) if you spawn one.
///
/// Only one part of the process may take the fds: another library that also reads
/// `LISTEN_FDS` (for instance `listenfd`) must not be used alongside this function.
pub fn listen_fds() -> Result<Vec<ListenFd>, Error> {
    let names = parse_listen_env(
        std::process::id(),
        std::env::var_os(LISTEN_PID).as_deref(),
        std::env::var_os(LISTEN_FDS).as_deref(),
        std::env::var_os(LISTEN_FDNAMES).as_deref(),
    )?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let fds = sys::take_listen_fds(names.len()).map_err(|err| match err {
        TakeError::AlreadyTaken => Error::AlreadyTaken,
        TakeError::TooMany => Error::invalid_env(
            LISTEN_FDS,
            &names.len().to_string(),
            "more fds than a process can have",
        ),
        TakeError::Fd { fd, source } => Error::MissingFd { fd, source },
    })?;
    Ok(names
        .into_iter()
        .zip(fds)
        .map(|(name, fd)| ListenFd { name, fd })
        .collect())
}

/// Reads the socket activation variables: the names of the sockets meant for `own_pid`, one per
/// fd, or none.
pub(crate) fn parse_listen_env(
    own_pid: u32,
    listen_pid: Option<&OsStr>,
    listen_fds: Option<&OsStr>,
    listen_fdnames: Option<&OsStr>,
) -> Result<Vec<String>, Error> {
    let Some(listen_pid) = env_str(LISTEN_PID, listen_pid)? else {
        return Ok(Vec::new());
    };
    let pid: u32 = match listen_pid.parse() {
        Ok(pid) if pid > 0 => pid,
        _ => return Err(Error::invalid_env(LISTEN_PID, listen_pid, "not a pid")),
    };
    if pid != own_pid {
        return Ok(Vec::new());
    }
    let Some(listen_fds) = env_str(LISTEN_FDS, listen_fds)? else {
        return Ok(Vec::new());
    };
    let count: usize = listen_fds
        .parse()
        .map_err(|_| Error::invalid_env(LISTEN_FDS, listen_fds, "not a number of fds"))?;
    let max = (RawFd::MAX - sys::LISTEN_FDS_START) as usize;
    if count > max {
        return Err(Error::invalid_env(
            LISTEN_FDS,
            listen_fds,
            format!("more than {max} fds"),
        ));
    }
    match env_str(LISTEN_FDNAMES, listen_fdnames)? {
        None => Ok(vec![UNNAMED_FD.to_owned(); count]),
        Some(_) if count == 0 => Ok(Vec::new()),
        Some(text) => {
            let names: Vec<String> = text
                .split(LISTEN_FDNAMES_SEPARATOR)
                .map(str::to_owned)
                .collect();
            if names.len() != count {
                return Err(Error::invalid_env(
                    LISTEN_FDNAMES,
                    text,
                    format!(
                        "expected {count} names (LISTEN_FDS={count}), found {}",
                        names.len()
                    ),
                ));
            }
            Ok(names)
        }
    }
}

impl ListenFd {
    /// The socket's name from `LISTEN_FDNAMES` (`"unknown"` when unnamed).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this is a listening TCP socket (IPv4 or IPv6), that is whether
    /// [`into_tcp_listener`](Self::into_tcp_listener) would succeed.
    pub fn is_tcp(&self) -> bool {
        SocketInfo::of(self.fd.as_fd()).is_ok_and(|info| info.is_tcp_listener())
    }

    /// Whether this is a listening Unix stream socket, that is whether
    /// [`into_unix_listener`](Self::into_unix_listener) would succeed.
    pub fn is_unix(&self) -> bool {
        SocketInfo::of(self.fd.as_fd()).is_ok_and(|info| info.is_unix_listener())
    }

    /// Converts a listening TCP socket into a [`TcpListener`] (blocking, as inherited).
    ///
    /// # Errors
    ///
    /// [`Error::WrongSocketKind`] when it is anything else; the fd is closed in this process
    /// then (check [`is_tcp`](Self::is_tcp) first to keep it).
    pub fn into_tcp_listener(self) -> Result<TcpListener, Error> {
        self.check("a listening TCP socket", SocketInfo::is_tcp_listener)?;
        Ok(TcpListener::from(self.fd))
    }

    /// Converts a listening Unix stream socket into a [`UnixListener`] (blocking, as inherited).
    ///
    /// # Errors
    ///
    /// [`Error::WrongSocketKind`] when it is anything else; the fd is closed in this process
    /// then (check [`is_unix`](Self::is_unix) first to keep it).
    pub fn into_unix_listener(self) -> Result<UnixListener, Error> {
        self.check(
            "a listening Unix stream socket",
            SocketInfo::is_unix_listener,
        )?;
        Ok(UnixListener::from(self.fd))
    }

    /// Gives up the name and returns the fd, for socket kinds this crate has no helper for.
    pub fn into_owned_fd(self) -> OwnedFd {
        self.fd
    }

    fn check(&self, expected: &'static str, wanted: fn(&SocketInfo) -> bool) -> Result<(), Error> {
        let found = match SocketInfo::of(self.fd.as_fd()) {
            Ok(info) if wanted(&info) => return Ok(()),
            Ok(info) => info.to_string(),
            Err(err) if err == rustix::io::Errno::NOTSOCK => "not a socket".to_owned(),
            Err(err) => format!("a socket that cannot be inspected ({err})"),
        };
        Err(Error::WrongSocketKind {
            name: self.name.clone(),
            fd: self.fd.as_raw_fd(),
            expected,
            found,
        })
    }
}

impl AsFd for ListenFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<ListenFd> for OwnedFd {
    fn from(listen_fd: ListenFd) -> Self {
        listen_fd.fd
    }
}

/// What the kernel says about a socket.
struct SocketInfo {
    family: AddressFamily,
    kind: SocketType,
    listening: bool,
}

impl SocketInfo {
    fn of(fd: BorrowedFd<'_>) -> rustix::io::Result<Self> {
        Ok(SocketInfo {
            family: rustix::net::getsockname(fd)?.address_family(),
            kind: sockopt::socket_type(fd)?,
            listening: sockopt::socket_acceptconn(fd)?,
        })
    }

    fn is_tcp_listener(&self) -> bool {
        matches!(self.family, AddressFamily::INET | AddressFamily::INET6)
            && self.kind == SocketType::STREAM
            && self.listening
    }

    fn is_unix_listener(&self) -> bool {
        self.family == AddressFamily::UNIX && self.kind == SocketType::STREAM && self.listening
    }
}

impl fmt::Display for SocketInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.family {
            AddressFamily::INET => f.write_str("an IPv4")?,
            AddressFamily::INET6 => f.write_str("an IPv6")?,
            AddressFamily::UNIX => f.write_str("a Unix")?,
            other => write!(f, "an address family {}", other.as_raw())?,
        }
        match self.kind {
            SocketType::STREAM => f.write_str(" stream socket")?,
            SocketType::DGRAM => f.write_str(" datagram socket")?,
            SocketType::SEQPACKET => f.write_str(" seqpacket socket")?,
            other => write!(f, " socket of type {}", other.as_raw())?,
        }
        if self.kind == SocketType::STREAM && !self.listening {
            f.write_str(" that is not listening")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::net::UdpSocket;
    use std::os::unix::ffi::OsStringExt;

    fn parse(
        pid: Option<&str>,
        fds: Option<&str>,
        names: Option<&str>,
    ) -> Result<Vec<String>, Error> {
        parse_listen_env(
            42,
            pid.map(OsStr::new),
            fds.map(OsStr::new),
            names.map(OsStr::new),
        )
    }

    fn invalid_var(result: Result<Vec<String>, Error>) -> &'static str {
        match result {
            Err(Error::InvalidEnv { var, .. }) => var,
            other => panic!("expected InvalidEnv, got {other:?}"),
        }
    }

    #[test]
    fn nothing_when_unset() {
        assert!(parse(None, None, None).unwrap().is_empty());
        assert!(parse(Some("42"), None, None).unwrap().is_empty());
        // Strict form: fds without LISTEN_PID are not for us.
        assert!(parse(None, Some("2"), None).unwrap().is_empty());
    }

    #[test]
    fn nothing_when_meant_for_another_process() {
        assert!(parse(Some("7"), Some("2"), None).unwrap().is_empty());
        // Another process's garbage is not our problem.
        assert!(
            parse(Some("7"), Some("x"), Some("a:b:c"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn names_default_to_unknown() {
        assert_eq!(
            parse(Some("42"), Some("2"), None).unwrap(),
            ["unknown", "unknown"]
        );
    }

    #[test]
    fn names_come_from_listen_fdnames() {
        assert_eq!(
            parse(Some("42"), Some("2"), Some("http:admin")).unwrap(),
            ["http", "admin"]
        );
        assert_eq!(parse(Some("42"), Some("1"), Some("")).unwrap(), [""]);
        assert!(parse(Some("42"), Some("0"), Some("")).unwrap().is_empty());
    }

    #[test]
    fn garbage_names_the_variable() {
        assert_eq!(invalid_var(parse(Some("x"), Some("1"), None)), LISTEN_PID);
        assert_eq!(invalid_var(parse(Some("0"), Some("1"), None)), LISTEN_PID);
        assert_eq!(invalid_var(parse(Some("-42"), Some("1"), None)), LISTEN_PID);
        assert_eq!(
            invalid_var(parse(Some("42"), Some("one"), None)),
            LISTEN_FDS
        );
        assert_eq!(invalid_var(parse(Some("42"), Some("-1"), None)), LISTEN_FDS);
        assert_eq!(
            invalid_var(parse(Some("42"), Some("99999999999"), None)),
            LISTEN_FDS
        );
        assert_eq!(
            invalid_var(parse(Some("42"), Some("2"), Some("http"))),
            LISTEN_FDNAMES
        );
        assert_eq!(
            invalid_var(parse(Some("42"), Some("1"), Some("a:b"))),
            LISTEN_FDNAMES
        );
    }

    #[test]
    fn non_utf8_names_the_variable() {
        let bad = OsString::from_vec(vec![b'4', 0xff]);
        let result = parse_listen_env(42, Some(&bad), Some(OsStr::new("1")), None);
        assert_eq!(invalid_var(result), LISTEN_PID);
    }

    #[test]
    fn error_message_says_which_variable_and_why() {
        let err = parse(Some("42"), Some("2"), Some("http")).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"LISTEN_FDNAMES="http" is invalid: expected 2 names (LISTEN_FDS=2), found 1"#
        );
    }

    fn listen_fd(fd: impl Into<OwnedFd>) -> ListenFd {
        ListenFd {
            name: "test".to_owned(),
            fd: fd.into(),
        }
    }

    #[test]
    fn tcp_listener_round_trip() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = listen_fd(listener);
        assert!(fd.is_tcp());
        assert!(!fd.is_unix());
        assert_eq!(fd.into_tcp_listener().unwrap().local_addr().unwrap(), addr);
    }

    #[test]
    fn unix_listener_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let fd = listen_fd(UnixListener::bind(&path).unwrap());
        assert!(fd.is_unix());
        assert!(!fd.is_tcp());
        let listener = fd.into_unix_listener().unwrap();
        assert_eq!(listener.local_addr().unwrap().as_pathname(), Some(&*path));
    }

    #[test]
    fn wrong_kind_says_what_it_is() {
        let udp = listen_fd(UdpSocket::bind("127.0.0.1:0").unwrap());
        assert!(!udp.is_tcp());
        let err = udp.into_tcp_listener().unwrap_err();
        assert!(
            err.to_string()
                .ends_with("is an IPv4 datagram socket, not a listening TCP socket"),
            "{err}"
        );

        let tcp = listen_fd(TcpListener::bind("127.0.0.1:0").unwrap());
        let err = tcp.into_unix_listener().unwrap_err();
        assert!(
            err.to_string()
                .ends_with("is an IPv4 stream socket, not a listening Unix stream socket"),
            "{err}"
        );

        let file = listen_fd(std::fs::File::open("/dev/null").unwrap());
        let err = file.into_tcp_listener().unwrap_err();
        assert!(
            err.to_string()
                .ends_with("is not a socket, not a listening TCP socket")
        );
    }

    #[test]
    fn connected_stream_is_not_a_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let err = listen_fd(stream).into_tcp_listener().unwrap_err();
        assert!(
            err.to_string()
                .contains("stream socket that is not listening"),
            "{err}"
        );
    }
}
