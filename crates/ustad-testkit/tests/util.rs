//! Spawning `test-worker` directly, the way ustad would: sockets at fd 3…, `LISTEN_PID` set.

use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ustad_testkit::process::{ProcessGuard, pass_fds};

pub(crate) fn test_worker() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_test-worker"))
}

/// A loopback listener on a free port.
pub(crate) fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0")
}

/// A duplicate of `listener`'s fd, to hand to a child.
pub(crate) fn fd_of(listener: &TcpListener) -> OwnedFd {
    OwnedFd::from(listener.try_clone().expect("dup"))
}

/// How to start a worker.
#[derive(Default)]
pub(crate) struct Spawn<'a> {
    pub(crate) args: &'a [&'a str],
    pub(crate) env: &'a [(&'a str, &'a str)],
    pub(crate) fds: Vec<OwnedFd>,
    /// Set `LISTEN_PID` to the worker's own pid (through `sh -c 'LISTEN_PID=$$ exec …'`).
    pub(crate) listen_pid: bool,
    pub(crate) pipe_stdout: bool,
}

/// Spawns `test-worker` with stdin from /dev/null and a clean socket-activation environment.
pub(crate) fn spawn_worker(spawn: Spawn<'_>) -> ProcessGuard {
    let mut cmd = if spawn.listen_pid {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
            .arg(test_worker());
        cmd
    } else {
        Command::new(test_worker())
    };
    cmd.args(spawn.args).stdin(Stdio::null());
    // stderr stays inherited: nextest shows it for failing tests.
    cmd.stdout(if spawn.pipe_stdout {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    for name in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "USTAD_WORKER_ID",
        "USTAD_WORKER_INDEX",
        "USTAD_POOL",
    ] {
        cmd.env_remove(name);
    }
    if !spawn.fds.is_empty() {
        cmd.env("LISTEN_FDS", spawn.fds.len().to_string());
    }
    for (name, value) in spawn.env {
        cmd.env(name, value);
    }
    pass_fds(&mut cmd, spawn.fds);
    ProcessGuard::spawn(&mut cmd).expect("spawning test-worker")
}

/// A datagram socket to pass as `NOTIFY_SOCKET`.
pub(crate) struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    pub(crate) fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Self { socket, path }
    }

    pub(crate) fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// The next datagram (panics after 20 s).
    pub(crate) fn recv(&self) -> String {
        let mut buf = [0u8; 512];
        let n = self.socket.recv(&mut buf).expect("a notify datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}
