//! Workers as another user (`--user`, `user = "…"`): ustad started as root binds the socket,
//! the workers run as `nobody` with its groups, and still use their socket and `NOTIFY_SOCKET`,
//! but cannot signal the primary. Needs root; skipped otherwise.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;

use crate::util::{Run, TIMEOUT, pid, run_in, ustad};

/// A directory anyone may read, with the Perl worker in it.
fn readable_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("ustad-users-")
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/identity.pl");
    std::fs::copy(script, dir.path().join("identity.pl")).expect("copying the worker");
    dir
}

/// `/proc/PID/status`'s line `key` (`Uid:`, then the ids, tab-separated).
fn proc_status(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the worker is alive")
        .lines()
        .find(|line| line.starts_with(key))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn workers_run_as_nobody_with_its_groups_and_still_use_their_socket_and_notify() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run workers as another user");
        return;
    }
    let dir = readable_dir();
    let cwd = dir.path().to_str().unwrap().to_owned();
    let mut run = Run::start(&[
        "run",
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--user",
        "nobody",
        "--cwd",
        &cwd,
        "--",
        "perl",
        "identity.pl",
    ]);
    // Ready by READY=1: the notify socket is open to them.
    let ready = run.wait_ready(2);
    for event in &ready {
        let worker = pid(event);
        assert!(proc_status(worker, "Uid:").ends_with("65534\t65534\t65534\t65534"));
        assert!(proc_status(worker, "Gid:").ends_with("65534\t65534\t65534\t65534"));
        let groups = proc_status(worker, "Groups:");
        assert_eq!(
            groups.trim_end(),
            "Groups:\t65534",
            "root's groups are gone"
        );
    }
    // What a worker says of itself.
    let line = run
        .cluster
        .wait_stdout_line(|line| line.contains("identity uid="), TIMEOUT);
    assert!(
        line.contains("uid=65534 euid=65534 gid=65534 groups=65534"),
        "{line}"
    );
    assert!(
        line.contains("signal_parent=no"),
        "it cannot signal the primary: {line}"
    );
    assert!(
        line.contains("home=/nonexistent user=nobody"),
        "a login's environment: {line}"
    );
    // The socket root bound serves through them.
    let mut stream = std::net::TcpStream::connect(run.addr("listen")).expect("connecting");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    run.stop();
}

#[test]
fn another_user_needs_root_and_an_unknown_user_is_named() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run ustad as another user");
        return;
    }
    let dir = readable_dir();
    let ustad = ustad().to_str().unwrap().to_owned();
    // ustad itself as nobody: asked for workers as root, it refuses before starting anything.
    let out = run_in(
        dir.path(),
        std::path::Path::new("setpriv"),
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &ustad,
            "run",
            "--user",
            "root",
            "--",
            "true",
        ],
        &[("XDG_RUNTIME_DIR", "/tmp")],
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr
            .contains("running workers as user `root` needs ustad to run as root"),
        "{out:?}"
    );
    // As root, a user that does not exist is a failed start that says so.
    let run = Run::start(&["run", "--user", "no-such-user-here", "--", "true"]);
    let failed = run.cluster.wait_event(|e| e.is("spawn_failed"), TIMEOUT);
    assert!(
        failed
            .str("error")
            .is_some_and(|e| e.contains("there is no user `no-such-user-here`")),
        "{failed}"
    );
}
