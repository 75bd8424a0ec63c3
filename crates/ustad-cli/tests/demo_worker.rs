//! The demo worker as ustad runs it: the real `ustad demo-worker` binary with real listening
//! sockets as fds 3 and 4, `LISTEN_PID` set to its own pid, and a real `NOTIFY_SOCKET`.
//!
//! The sockets reach the child as its stdin (and stdout), which a shell moves to fds 3 (and 4)
//! before exec'ing the worker; `exec` keeps the shell's pid, which is what `LISTEN_PID` names.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for anything the tests wait for.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A running `ustad demo-worker`, killed on drop.
struct Worker {
    child: Child,
    notify: Option<(tempfile::TempDir, UnixDatagram)>,
}

/// How to start a [`Worker`].
struct Spawn {
    idle_grace: &'static str,
    /// Becomes fd 3, and the second one fd 4.
    sockets: Vec<OwnedFd>,
    names: Option<&'static str>,
    /// `None` sets `LISTEN_PID` to the worker's own pid.
    listen_pid: Option<&'static str>,
    notify: bool,
    identity: bool,
}

impl Default for Spawn {
    fn default() -> Self {
        Spawn {
            idle_grace: "300ms",
            sockets: Vec::new(),
            names: None,
            listen_pid: None,
            notify: true,
            identity: true,
        }
    }
}

impl Spawn {
    fn new(socket: impl Into<OwnedFd>) -> Self {
        Spawn {
            sockets: vec![socket.into()],
            ..Spawn::default()
        }
    }

    fn command(self) -> (Command, Option<(tempfile::TempDir, UnixDatagram)>) {
        let fds = match self.sockets.len() {
            0 => "",
            1 => "3<&0 0</dev/null",
            2 => "3<&0 4<&1 0</dev/null 1>&2",
            n => panic!("{n} sockets: at most 2 are supported"),
        };
        let listen_pid = self.listen_pid.unwrap_or("$$");
        let script = format!("export LISTEN_PID={listen_pid}; exec \"$0\" \"$@\" {fds}");
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(script)
            .arg(env!("CARGO_BIN_EXE_ustad"))
            .args(["demo-worker", "--idle-grace", self.idle_grace])
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("USTAD_POOL")
            .env_remove("USTAD_WORKER_ID")
            .env_remove("USTAD_WORKER_INDEX")
            // Errors the tests provoke need no backtrace; panics keep theirs.
            .env("RUST_LIB_BACKTRACE", "0")
            .env("LISTEN_FDS", self.sockets.len().to_string());
        if let Some(names) = self.names {
            command.env("LISTEN_FDNAMES", names);
        }
        if self.identity {
            command
                .env("USTAD_POOL", "demo")
                .env("USTAD_WORKER_ID", "7")
                .env("USTAD_WORKER_INDEX", "0");
        }
        let mut sockets = self.sockets.into_iter();
        command.stdin(sockets.next().map_or_else(Stdio::null, Stdio::from));
        if let Some(socket) = sockets.next() {
            command.stdout(Stdio::from(socket));
        }
        let notify = self.notify.then(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify.sock");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket.set_read_timeout(Some(TIMEOUT)).unwrap();
            command.env("NOTIFY_SOCKET", &path);
            (dir, socket)
        });
        (command, notify)
    }

    fn spawn(self) -> Worker {
        let (mut command, notify) = self.command();
        let child = command.spawn().unwrap();
        let worker = Worker { child, notify };
        if worker.notify.is_some() {
            worker.expect_notify("READY=1");
        }
        worker
    }
}

impl Worker {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `INT`) with the shell's `kill`.
    fn signal(&self, signal: &str) {
        let status = Command::new("/bin/sh")
            .args(["-c", "kill -s \"$1\" \"$2\"", "sh", signal])
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {signal} failed");
    }

    /// The next datagram on `NOTIFY_SOCKET` is `expected`.
    fn expect_notify(&self, expected: &str) {
        let (_, socket) = self.notify.as_ref().expect("spawned without NOTIFY_SOCKET");
        let mut buf = [0; 1024];
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|err| panic!("no {expected:?} on NOTIFY_SOCKET: {err}"));
        assert_eq!(String::from_utf8_lossy(&buf[..n]), expected);
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the worker did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Just enough HTTP/1.1 client: requests written by hand, responses parsed by
/// `Content-Length`.
struct Client<S> {
    stream: S,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|value| value.eq_ignore_ascii_case("close"))
    }
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n";

impl Client<TcpStream> {
    fn tcp(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }
}

impl Client<UnixStream> {
    fn unix(path: &std::path::Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }
}

impl<S: Read + Write> Client<S> {
    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn get(&mut self) -> Response {
        self.send(GET);
        self.response()
    }

    /// Reads more bytes into `buf`; returns how many (0 at end of stream).
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0; 4096];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn response(&mut self) -> Response {
        let head_len = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = self.fill().expect("reading the response head");
            assert!(n > 0, "connection closed before a response");
        };
        let head = String::from_utf8(self.buf.drain(..head_len).collect()).unwrap();
        let mut lines = head.trim_end().split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (key, value) = line.split_once(':').unwrap();
                (key.to_owned(), value.trim().to_owned())
            })
            .collect();
        let mut response = Response {
            status,
            headers,
            body: String::new(),
        };
        let len: usize = response
            .header("content-length")
            .expect("a Content-Length")
            .parse()
            .unwrap();
        while self.buf.len() < len {
            let n = self.fill().expect("reading the body");
            assert!(n > 0, "connection closed in the body");
        }
        response.body = String::from_utf8(self.buf.drain(..len).collect()).unwrap();
        response
    }

    /// The server closes the connection (cleanly, with nothing more to read) within `TIMEOUT`.
    fn expect_closed(&mut self) {
        let n = self.fill().expect("waiting for the server to close");
        assert_eq!(n, 0, "expected end of stream, got {:?}", self.buf);
    }
}

fn tcp_socket() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

fn expect_hello(response: &Response, worker: &str, pid: u32) {
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.body,
        format!("hello from worker {worker} (pid {pid})\n")
    );
    assert_eq!(response.header("x-worker-pid"), Some(&*pid.to_string()));
    assert_eq!(response.header("content-type"), Some("text/plain"));
    assert_eq!(
        response.header("content-length"),
        Some(&*response.body.len().to_string())
    );
}

#[test]
fn serves_hello_with_its_pid_over_keep_alive() {
    let (socket, addr) = tcp_socket();
    let worker = Spawn::new(socket).spawn();
    let mut client = Client::tcp(addr);
    for _ in 0..3 {
        let response = client.get();
        expect_hello(&response, "7", worker.pid());
        assert!(!response.closes(), "{response:?}");
    }
    // Pipelined requests are answered in order.
    client.send(&GET.repeat(3));
    for _ in 0..3 {
        expect_hello(&client.response(), "7", worker.pid());
    }
    let mut other = Client::tcp(addr);
    expect_hello(&other.get(), "7", worker.pid());
}

#[test]
fn serves_tcp_and_unix_sockets_without_identity() {
    let (tcp, addr) = tcp_socket();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("http.sock");
    let unix = UnixListener::bind(&path).unwrap();
    let worker = Spawn {
        sockets: vec![tcp.into(), unix.into()],
        names: Some("http:local"),
        identity: false,
        ..Spawn::default()
    }
    .spawn();
    expect_hello(&Client::tcp(addr).get(), "?", worker.pid());
    expect_hello(&Client::unix(&path).get(), "?", worker.pid());
}

#[test]
fn sends_ready_then_exits_0_on_sigint_when_idle() {
    let (socket, _) = tcp_socket();
    // `spawn` waits for READY=1.
    let mut worker = Spawn::new(socket).spawn();
    worker.signal("INT");
    worker.expect_notify("STOPPING=1");
    assert!(worker.wait_exit().success());
}

#[test]
fn drains_without_a_client_error() {
    const GRACE: Duration = Duration::from_secs(2);
    let (socket, addr) = tcp_socket();
    // Like the primary, the test keeps its own copy of the socket open.
    let primary = socket.try_clone().unwrap();
    let mut worker = Spawn {
        idle_grace: "2s",
        ..Spawn::new(socket)
    }
    .spawn();
    let pid = worker.pid();

    // All four are accepted and served before the drain.
    let mut busy = Client::tcp(addr);
    let mut idle = Client::tcp(addr);
    let mut untouched = Client::tcp(addr);
    let mut in_flight = Client::tcp(addr);
    for client in [&mut busy, &mut idle, &mut untouched, &mut in_flight] {
        let response = client.get();
        expect_hello(&response, "7", pid);
        assert!(!response.closes());
    }
    in_flight.send(b"GET / HTTP/1.1\r\nHost: demo\r\n");

    let drain_began = Instant::now();
    worker.signal("TERM");
    worker.expect_notify("STOPPING=1");

    // The request in flight is answered, with `Connection: close`, then the connection closes.
    in_flight.send(b"\r\n");
    let response = in_flight.response();
    expect_hello(&response, "7", pid);
    assert!(response.closes(), "{response:?}");
    in_flight.expect_closed();

    // The next request on a keep-alive connection is answered, and closes it.
    let response = busy.get();
    expect_hello(&response, "7", pid);
    assert!(response.closes(), "{response:?}");
    busy.expect_closed();

    // An idle connection stays usable for a while after the drain began.
    std::thread::sleep((drain_began + GRACE / 4).saturating_duration_since(Instant::now()));
    let response = idle.get();
    expect_hello(&response, "7", pid);
    assert!(response.closes(), "{response:?}");
    idle.expect_closed();

    // A connection that stays idle is closed once the grace is over.
    untouched.expect_closed();
    let closed_after = drain_began.elapsed();
    assert!(closed_after >= GRACE, "closed after {closed_after:?}");

    // A connection made now waits in the kernel's queue: this worker no longer accepts.
    let late = TcpStream::connect(addr).unwrap();
    assert!(worker.wait_exit().success());
    let (_, peer) = primary.accept().unwrap();
    assert_eq!(peer, late.local_addr().unwrap());
}

#[test]
fn second_signal_during_the_drain_exits_at_once() {
    let (socket, addr) = tcp_socket();
    let mut worker = Spawn {
        idle_grace: "1h",
        ..Spawn::new(socket)
    }
    .spawn();
    let mut client = Client::tcp(addr);
    expect_hello(&client.get(), "7", worker.pid());
    worker.signal("TERM");
    worker.expect_notify("STOPPING=1");
    worker.signal("TERM");
    // Not 0: a connection was cut.
    assert!(!worker.wait_exit().success());
    client.expect_closed();
}

fn expect_refusal(spawn: Spawn) {
    let (mut command, _notify) = spawn.command();
    let output = command.output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no sockets: run me under `ustad run`"),
        "{stderr}"
    );
}

#[test]
fn refuses_to_run_without_sockets() {
    expect_refusal(Spawn::default());
}

#[test]
fn ignores_sockets_meant_for_another_process() {
    expect_refusal(Spawn {
        listen_pid: Some("1"),
        ..Spawn::new(tcp_socket().0)
    });
}
