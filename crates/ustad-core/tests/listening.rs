//! `listening::find` on real servers: each one is handed a listening socket as its stdin,
//! says it is armed, and waits for SIGUSR2 before it waits for connections, so that the test
//! sees it first not listening, then listening, in the way that kind of server waits.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ustad_core::listening::{self, Wait};

/// A Python server that waits in the way `mode` names.
const PYTHON: &str = r#"
import asyncio, os, select, signal, socket, sys, threading
mode = sys.argv[1]
sock = socket.socket(fileno=os.dup(0))
other = socket.socket(); other.bind(("127.0.0.1", 0)); other.listen()
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
print("armed", os.getpid(), file=sys.stderr, flush=True)
signal.sigwait([signal.SIGUSR2])
if mode == "accept":
    sock.accept()
elif mode == "thread-accept":
    t = threading.Thread(target=sock.accept); t.start(); t.join()
elif mode == "poll":
    p = select.poll(); p.register(sock, select.POLLIN); p.poll()
elif mode == "select":
    select.select([sock], [], [])
elif mode == "asyncio":
    async def main():
        server = await asyncio.start_server(lambda r, w: w.close(), sock=sock)
        await server.serve_forever()
    asyncio.run(main())
elif mode == "other-socket":
    other.accept()
"#;

/// A Node server: `listen({fd})` (libuv, epoll).
const NODE: &str = r#"
process.on('SIGUSR2', () => require('net').createServer((c) => c.end()).listen({ fd: 0 }));
setInterval(() => {}, 1 << 30); // a signal handler alone does not keep Node running
console.error(`armed ${process.pid}`);
"#;

/// Kills the server's whole process group when the test ends, however it ends.
struct Server {
    child: Child,
    /// The process that waits for SIGUSR2 (the child, or its child under a wrapper).
    armed: u32,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(group) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.child.wait();
    }
}

fn start(mut command: Command, socket: BorrowedFd<'_>) -> Server {
    let stdin: OwnedFd = socket.try_clone_to_owned().unwrap();
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server");
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let armed = line
        .strip_prefix("armed ")
        .and_then(|pid| pid.trim().parse().ok());
    let Some(armed) = armed else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the server did not arm: {line:?}");
    };
    Server { child, armed }
}

fn python(mode: &str) -> Command {
    let mut command = Command::new("python3");
    command.args(["-c", PYTHON, mode]);
    command
}

/// Asserts that the server is not seen listening until it is told to, then that it is, in
/// the way `how`.
fn check(command: Command, how: Wait) {
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    check_on(socket.as_fd(), command, how);
}

fn check_on(socket: BorrowedFd<'_>, command: Command, how: Wait) {
    let inode = listening::inode_of(socket).unwrap();
    let server = start(command, socket);
    let root = server.child.id();
    assert_eq!(
        listening::find(root, &[inode]),
        None,
        "seen before it waits"
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(server.armed as i32).unwrap(),
        rustix::process::Signal::USR2,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let sighting = loop {
        if let Some(sighting) = listening::find(root, &[inode]) {
            break sighting;
        }
        assert!(Instant::now() < deadline, "not seen listening in 20 s");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(sighting.inode, inode);
    assert_eq!(sighting.pid, server.armed);
    assert_eq!(sighting.how, how);
}

#[test]
fn python_blocked_in_accept() {
    check(python("accept"), Wait::Accept);
}

#[test]
fn python_thread_blocked_in_accept() {
    check(python("thread-accept"), Wait::Accept);
}

#[test]
fn python_poll() {
    check(python("poll"), Wait::Poll);
}

#[test]
fn python_select() {
    check(python("select"), Wait::Select);
}

#[test]
fn python_asyncio() {
    check(python("asyncio"), Wait::Epoll);
}

#[test]
fn node_listen_fd() {
    let mut command = Command::new("node");
    command.args(["-e", NODE]);
    check(command, Wait::Epoll);
}

#[test]
fn a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = UnixListener::bind(dir.path().join("app.sock")).unwrap();
    check_on(socket.as_fd(), python("asyncio"), Wait::Epoll);
    let mut node = Command::new("node");
    node.args(["-e", NODE]);
    check_on(socket.as_fd(), node, Wait::Epoll);
}

#[test]
fn a_server_under_a_shell_wrapper() {
    let mut command = Command::new("sh");
    // `; exit $?` keeps the shell as the server's parent (a lone command would be exec'd).
    command.args(["-c", "python3 -c \"$0\" accept; exit $?", PYTHON]);
    check(command, Wait::Accept);
}

#[test]
fn waiting_on_another_socket_is_not_listening() {
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let inode = listening::inode_of(socket.as_fd()).unwrap();
    let server = start(python("other-socket"), socket.as_fd());
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(server.armed as i32).unwrap(),
        rustix::process::Signal::USR2,
    )
    .unwrap();
    // Wait until it waits (on its other socket), then check ours is not the one.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let syscall = std::fs::read_to_string(format!("/proc/{}/syscall", server.armed));
        if syscall.is_ok_and(|line| {
            line.split_whitespace()
                .next()
                .and_then(|n| n.parse::<i64>().ok())
                == Some(libc_accept4())
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server never blocked in accept"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(listening::find(server.child.id(), &[inode]), None);
}

fn libc_accept4() -> i64 {
    #[cfg(target_arch = "x86_64")]
    return 288;
    #[cfg(target_arch = "aarch64")]
    return 242;
}
