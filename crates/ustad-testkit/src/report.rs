//! What a `test-worker` really received, as written by `test-worker --report <path>`: its ids,
//! environment, inherited fds, and what the `sd-notify` and `listenfd` crates each make of them.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SocketType};
use serde::{Deserialize, Serialize};
use ustad_proto::env::{
    LISTEN_FDNAMES, LISTEN_FDS, LISTEN_PID, NOTIFY_SOCKET, USTAD_POOL, USTAD_WORKER_ID,
    USTAD_WORKER_INDEX,
};

use crate::sys;

/// Environment variables every report includes (as `null` when unset).
pub const REPORTED_ENV: &[&str] = &[
    LISTEN_FDS,
    LISTEN_PID,
    LISTEN_FDNAMES,
    NOTIFY_SOCKET,
    USTAD_POOL,
    USTAD_WORKER_ID,
    USTAD_WORKER_INDEX,
];

/// A `test-worker`'s report. Field names are the JSON keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// `getpid()`.
    pub pid: u32,
    /// `getppid()` (0 if the parent is outside our pid namespace).
    pub ppid: u32,
    /// `getpgid(0)`.
    pub pgid: u32,
    /// The worker's arguments, without the program name.
    pub args: Vec<String>,
    /// The working directory, if it could be read.
    pub cwd: Option<String>,
    /// [`REPORTED_ENV`] plus each `--env-report NAME`, read at start (before `listenfd` removes
    /// `LISTEN_FDS` and `LISTEN_PID` from the environment).
    pub env: BTreeMap<String, Option<String>>,
    /// One probe per fd from 3 to `3 + LISTEN_FDS - 1`.
    pub listen_fds: Vec<FdProbe>,
    /// What the strict `sd_notify::listen_fds()` returned: it requires `LISTEN_PID` to be our
    /// pid and yields nothing otherwise. `None` if it returned an error.
    pub sd_notify_listen_fds: Option<Vec<RawFd>>,
    /// The error `sd_notify::listen_fds()` returned, if any.
    pub sd_notify_error: Option<String>,
    /// `listenfd::ListenFd::from_env().len()`: the relaxed crate accepts a missing or empty
    /// `LISTEN_PID`.
    pub listenfd_count: usize,
    /// What `listenfd`'s `take_tcp_listener(0)` returned.
    pub listenfd_tcp_listener_0: Take,
    /// Where fd 0 points (`readlink /proc/self/fd/0`), if open.
    pub stdin_target: Option<String>,
    /// Whether fd 0 is `/dev/null`.
    pub stdin_is_dev_null: bool,
    /// The pid of the grandchild started by `--grandchild`.
    pub grandchild_pid: Option<u32>,
    /// Every fd ≥ 3 open when the worker started, before it opened anything itself.
    pub open_fds: Vec<OpenFd>,
}

/// The outcome of taking a socket out of `listenfd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Take {
    /// A socket of the requested kind.
    Ok,
    /// No fd at that index.
    None,
    /// The fd is not a socket of the requested kind (or another error).
    Error(String),
}

/// What an inherited fd is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FdProbe {
    /// The fd number.
    pub fd: RawFd,
    /// Whether the fd is open at all.
    pub open: bool,
    /// Whether it is a socket.
    pub is_socket: bool,
    /// Whether it is a listening socket (`SO_ACCEPTCONN`).
    pub listening: bool,
    /// `stream`, `dgram`, `seqpacket`, `raw` or another number.
    pub socket_type: Option<String>,
    /// `inet`, `inet6`, `unix` or another number.
    pub family: Option<String>,
    /// `getsockname`: `ip:port`, a unix socket's path, or `@name` for an abstract one.
    pub local_addr: Option<String>,
    /// Whether `O_NONBLOCK` is set. The flag belongs to the open file description, which is
    /// shared with the primary and every other worker that inherited the socket.
    pub nonblocking: Option<bool>,
}

impl FdProbe {
    /// The local address as an IP socket address, if it is one.
    pub fn local_socket_addr(&self) -> Option<SocketAddr> {
        self.local_addr.as_deref()?.parse().ok()
    }
}

/// An open fd and where `/proc/self/fd/<fd>` points (`socket:[…]`, `pipe:[…]`, a path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct OpenFd {
    /// The fd number.
    pub fd: RawFd,
    /// The link target.
    pub target: String,
}

impl WorkerReport {
    /// The value of a reported environment variable.
    pub fn env(&self, name: &str) -> Option<&str> {
        self.env.get(name)?.as_deref()
    }

    /// The open fd numbers ≥ 3, in order.
    pub fn open_fd_numbers(&self) -> Vec<RawFd> {
        self.open_fds.iter().map(|f| f.fd).collect()
    }

    /// Reads a report.
    ///
    /// # Errors
    ///
    /// If the file cannot be read or is not a report.
    pub fn read(path: &Path) -> io::Result<Self> {
        let text = fs::read(path)?;
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Waits for the report at `path` to appear and reads it. Reports are written atomically,
    /// so a report that exists is complete. Polls every 10 ms: a file appearing cannot be
    /// waited on more cheaply without inotify.
    ///
    /// # Panics
    ///
    /// If no report appears within `timeout`, or it cannot be parsed.
    #[track_caller]
    pub fn wait_for(path: &Path, timeout: Duration) -> Self {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::read(path) {
                Ok(report) => return report,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => panic!("reading worker report {}: {e}", path.display()),
            }
            if Instant::now() >= deadline {
                panic!("no worker report at {} after {timeout:?}", path.display());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Writes the report atomically: to a temporary file beside `path`, then renamed over it.
    ///
    /// # Errors
    ///
    /// If the temporary file cannot be written or renamed.
    pub fn write_atomic(&self, path: &Path) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp.{}", self.pid));
        let tmp = PathBuf::from(tmp);
        fs::write(&tmp, json)?;
        fs::rename(&tmp, path)
    }
}

/// Replaces `{pid}`, `{id}` (`USTAD_WORKER_ID`) and `{index}` (`USTAD_WORKER_INDEX`) in a
/// `--report` path (`none` for an unset variable), so that several workers of one pool can share
/// one command line.
pub fn expand_report_path(
    template: &str,
    pid: u32,
    id: Option<&str>,
    index: Option<&str>,
) -> PathBuf {
    PathBuf::from(
        template
            .replace("{pid}", &pid.to_string())
            .replace("{id}", id.unwrap_or("none"))
            .replace("{index}", index.unwrap_or("none")),
    )
}

/// Probes fd `fd`: open, socket, listening, type, family, local address, `O_NONBLOCK`.
pub fn probe_fd(fd: RawFd) -> FdProbe {
    let mut probe = FdProbe {
        fd,
        open: false,
        is_socket: false,
        listening: false,
        socket_type: None,
        family: None,
        local_addr: None,
        nonblocking: None,
    };
    sys::with_raw_fd(fd, |bfd| {
        probe.open = true;
        probe.nonblocking = rustix::fs::fcntl_getfl(bfd)
            .ok()
            .map(|flags| flags.contains(rustix::fs::OFlags::NONBLOCK));
        probe.is_socket = rustix::fs::fstat(bfd).is_ok_and(|st| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket
        });
        if !probe.is_socket {
            return;
        }
        probe.listening = rustix::net::sockopt::socket_acceptconn(bfd).unwrap_or(false);
        probe.socket_type = rustix::net::sockopt::socket_type(bfd)
            .ok()
            .map(socket_type_name);
        probe.family = rustix::net::sockopt::socket_domain(bfd)
            .ok()
            .map(family_name);
        probe.local_addr = rustix::net::getsockname(bfd).ok().map(|addr| {
            if let Ok(ip) = SocketAddr::try_from(addr.clone()) {
                return ip.to_string();
            }
            match rustix::net::SocketAddrUnix::try_from(addr) {
                Ok(unix) => {
                    if let Some(path) = unix.path_bytes() {
                        String::from_utf8_lossy(path).into_owned()
                    } else if let Some(name) = unix.abstract_name() {
                        format!("@{}", String::from_utf8_lossy(name))
                    } else {
                        "(unnamed)".to_owned()
                    }
                }
                Err(_) => "(other)".to_owned(),
            }
        });
    });
    probe
}

fn socket_type_name(ty: SocketType) -> String {
    match ty {
        SocketType::STREAM => "stream".to_owned(),
        SocketType::DGRAM => "dgram".to_owned(),
        SocketType::SEQPACKET => "seqpacket".to_owned(),
        SocketType::RAW => "raw".to_owned(),
        other => other.as_raw().to_string(),
    }
}

fn family_name(family: AddressFamily) -> String {
    match family {
        AddressFamily::INET => "inet".to_owned(),
        AddressFamily::INET6 => "inet6".to_owned(),
        AddressFamily::UNIX => "unix".to_owned(),
        other => other.as_raw().to_string(),
    }
}

/// A new fd (close-on-exec) for the same open file as inherited fd number `fd`, or `None` if
/// `fd` is not open. The inherited fd itself stays open.
pub fn dup_fd(fd: RawFd) -> Option<OwnedFd> {
    sys::with_raw_fd(fd, |bfd| bfd.try_clone_to_owned().ok()).flatten()
}

/// Every open fd ≥ 3 of this process and its target, from `/proc/self/fd` (leaving out the
/// directory handle used to list it).
pub fn open_fds() -> Vec<OpenFd> {
    let own_dir = format!("/proc/{}/fd", std::process::id());
    let mut fds = Vec::new();
    let Ok(entries) = fs::read_dir("/proc/self/fd") else {
        return fds;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        if fd < 3 {
            continue;
        }
        let target = fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        if target == own_dir || target.is_empty() {
            continue;
        }
        fds.push(OpenFd { fd, target });
    }
    fds.sort_by_key(|f| f.fd);
    fds
}
