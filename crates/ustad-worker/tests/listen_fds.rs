//! `listen_fds()` in a real process: this test binary re-executes itself with a listening socket
//! as fd 3, the way ustad starts a worker.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use rustix::io::{FdFlags, fcntl_getfd};
use ustad_worker::{Error, listen_fds};

/// Set in the re-executed child, which then runs [`child`].
const CHILD: &str = "USTAD_WORKER_TEST_CHILD";

/// Runs the current test binary's `test` with `listener` as fd 3 and `LISTEN_PID` set to the
/// child's own pid (via `exec`, which keeps the shell's pid). `listen_pid` overrides it.
fn run_child(test: &str, listener: OwnedFd, listen_pid: Option<&str>) -> std::process::Output {
    let script = match listen_pid {
        Some(pid) => format!("export LISTEN_PID={pid}; exec \"$0\" \"$@\" 3<&0 0</dev/null"),
        None => "export LISTEN_PID=$$; exec \"$0\" \"$@\" 3<&0 0</dev/null".to_owned(),
    };
    let output = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "http")
        .stdin(Stdio::from(listener))
        .output()
        .unwrap();
    // Guard against a filter that matches nothing, which would pass vacuously.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("1 passed"),
        "child did not run {test}: {output:?}"
    );
    output
}

#[test]
fn takes_the_inherited_socket() {
    if std::env::var_os(CHILD).is_some() {
        let fds = listen_fds().unwrap();
        assert_eq!(fds.len(), 1);
        assert_eq!(fds[0].name(), "http");
        assert!(fds[0].is_tcp());
        // Close-on-exec, so that it does not leak into our own children.
        let flags = fcntl_getfd(fds[0].as_fd()).unwrap();
        assert!(flags.contains(FdFlags::CLOEXEC));
        // Only one owner per fd.
        assert!(matches!(listen_fds(), Err(Error::AlreadyTaken)));
        let listener = fds.into_iter().next().unwrap().into_tcp_listener().unwrap();
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(b"taken").unwrap();
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    });
    let output = run_child("takes_the_inherited_socket", listener.into(), None);
    assert!(output.status.success(), "child failed: {output:?}");
    assert_eq!(reader.join().unwrap(), "taken");
}

#[test]
fn ignores_sockets_meant_for_another_pid() {
    if std::env::var_os(CHILD).is_some() {
        assert!(listen_fds().unwrap().is_empty());
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // pid 1 is never the child.
    let output = run_child(
        "ignores_sockets_meant_for_another_pid",
        listener.into(),
        Some("1"),
    );
    assert!(output.status.success(), "child failed: {output:?}");
}
