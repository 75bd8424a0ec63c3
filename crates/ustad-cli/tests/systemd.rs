//! ustad under a service manager: it takes the sockets systemd passes it (socket activation)
//! instead of binding them, keeps them (and their socket files) systemd's, never lets its own
//! `LISTEN_*`, `NOTIFY_SOCKET` or `WATCHDOG_*` reach its workers, and reports its own state on
//! its `NOTIFY_SOCKET`.
//!
//! The tests play systemd: they bind the sockets, hand them to ustad as fds 3, 4, … through
//! `/bin/sh`, which sets `LISTEN_PID` to its own pid before it execs ustad (the pid ustad
//! keeps), and read ustad's notifications on a datagram socket of their own.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use tempfile::TempDir;
use ustad_testkit::Signal;
use ustad_testkit::cluster::Cluster;
use ustad_testkit::process::pass_fds;
use ustad_testkit::report::WorkerReport;

use crate::util::{TIMEOUT, pid, test_worker, ustad};

/// `O_CLOEXEC` as `/proc/<pid>/fdinfo` shows it (octal flags).
const O_CLOEXEC: u32 = 0o2_000_000;

/// Starts `ustad --log-format json run ustad.toml` in `dir` as systemd would: `sockets` as fds
/// 3, 4, … named in `LISTEN_FDNAMES`, `LISTEN_PID` the primary's own pid, and `env` on top
/// (none of the test's own `LISTEN_*` or `NOTIFY_SOCKET`).
fn start_activated(dir: &Path, sockets: Vec<(&str, OwnedFd)>, env: &[(&str, &str)]) -> Cluster {
    let names: Vec<&str> = sockets.iter().map(|(name, _)| *name).collect();
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", r#"LISTEN_PID=$$ exec "$0" "$@""#])
        .arg(ustad())
        .args(["--log-format", "json", "run", "ustad.toml"])
        .env_remove("LISTEN_PID")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env("LISTEN_FDS", sockets.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"));
    for (name, value) in env {
        command.env(name, value);
    }
    pass_fds(
        &mut command,
        sockets.into_iter().map(|(_, fd)| fd).collect(),
    );
    Cluster::start_command(command, dir)
}

/// A TCP port on 127.0.0.1 that nothing listens on.
fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Whether fd `fd` of process `pid` is close-on-exec.
fn is_cloexec(pid: u32, fd: i32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let flags = info
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))
        .unwrap_or_else(|| panic!("no flags in {info}"));
    u32::from_str_radix(flags.trim(), 8).unwrap() & O_CLOEXEC != 0
}

#[test]
fn systemd_sockets_are_taken_instead_of_bound_and_stay_systemds() {
    let dir = tempfile::tempdir().unwrap();
    let configured = free_address();
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let http_address = http.local_addr().unwrap();
    let admin_path = dir.path().join("admin.sock");
    let admin = UnixListener::bind(&admin_path).unwrap();
    // The manager's own notify socket: workers must never be given it.
    let manager_notify = dir.path().join("systemd-notify");
    let _manager = UnixDatagram::bind(&manager_notify).unwrap();
    let worker = test_worker();
    std::fs::write(
        dir.path().join("ustad.toml"),
        format!(
            r#"
[sockets.http]
listen = "{configured}"

[sockets.admin]
listen = "unix:{admin}"

[pools.web]
command = ["{worker}", "--serve-http", "--report", "web-{{index}}.json", "--env-report", "WATCHDOG_USEC"]
size = 2
sockets = ["http", "admin"]
ready = "notify"

[pools.plain]
command = ["{worker}", "--report", "plain.json", "--env-report", "WATCHDOG_USEC"]
ready = "none"
"#,
            admin = admin_path.display(),
        ),
    )
    .unwrap();
    let mut cluster = start_activated(
        dir.path(),
        vec![
            ("http", http.try_clone().unwrap().into()),
            ("admin", admin.try_clone().unwrap().into()),
        ],
        &[
            ("NOTIFY_SOCKET", manager_notify.to_str().unwrap()),
            ("WATCHDOG_USEC", "30000000"),
        ],
    );

    assert_eq!(
        cluster.listen_addr("http"),
        http_address,
        "the socket systemd passed"
    );
    let inherited = cluster.wait_events(|e| e.is("inherited"), 2, TIMEOUT);
    assert_eq!(inherited[0].u64("fd"), Some(3), "{}", inherited[0]);
    assert_eq!(inherited[1].str("socket"), Some("admin"));
    let ready = cluster.wait_events(|e| e.is("ready"), 3, TIMEOUT);
    for fd in [3, 4] {
        assert!(
            is_cloexec(cluster.pid(), fd),
            "fd {fd} of ustad is close-on-exec"
        );
    }

    let (status, headers, _) = ustad_testkit::load::get(http_address).unwrap();
    assert_eq!(status, 200);
    let server: u32 = headers["x-worker-pid"].parse().unwrap();
    let web_pids: Vec<u32> = ready
        .iter()
        .filter(|e| e.str("pool") == Some("web"))
        .map(pid)
        .collect();
    assert!(web_pids.contains(&server), "{server} in {web_pids:?}");
    assert_eq!(
        TcpStream::connect(configured).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the configured {configured} is not bound"
    );

    for index in 0..2 {
        let report = WorkerReport::wait_for(&dir.path().join(format!("web-{index}.json")), TIMEOUT);
        assert_eq!(
            report.env("LISTEN_PID"),
            Some(report.pid.to_string().as_str())
        );
        assert_eq!(report.env("LISTEN_FDS"), Some("2"));
        assert_eq!(report.env("LISTEN_FDNAMES"), Some("http:admin"));
        let notify = report.env("NOTIFY_SOCKET").expect("a notify pool");
        assert_ne!(
            Path::new(notify),
            manager_notify,
            "the primary's own socket, not systemd's"
        );
        assert_eq!(report.env("WATCHDOG_USEC"), None);
        assert_eq!(report.listen_fds[0].local_socket_addr(), Some(http_address));
        assert!(report.listen_fds[1].listening);
    }
    let plain = WorkerReport::wait_for(&dir.path().join("plain.json"), TIMEOUT);
    for name in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
    ] {
        assert_eq!(plain.env(name), None, "{name} reached a worker");
    }
    assert!(
        plain.open_fds.is_empty(),
        "fds leaked into a worker without sockets: {:?}",
        plain.open_fds
    );

    cluster.signal(Signal::TERM).unwrap();
    let status = cluster.wait_exit(TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "stderr:\n{}",
        cluster.stderr_tail(30)
    );
    assert!(
        admin_path.exists(),
        "systemd's socket file is left in place"
    );
    TcpStream::connect(http_address).expect("systemd's socket still listens after ustad exits");
    std::os::unix::net::UnixStream::connect(&admin_path).expect("so does systemd's Unix socket");
}

#[test]
fn a_passed_socket_named_after_no_configured_socket_stops_ustad_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ustad.toml"),
        format!(
            "[sockets.http]\nlisten = \"127.0.0.1:0\"\n[pools.web]\ncommand = [\"{}\"]\nsockets = [\"http\"]\n",
            test_worker()
        ),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // systemd's default name: the socket unit's, when FileDescriptorName= is not set.
    let mut cluster = start_activated(dir.path(), vec![("ustad.socket", listener.into())], &[]);
    let status = cluster.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(1));
    let stderr = cluster.stderr_lines().join("\n");
    assert!(
        stderr.contains("fd 3 is named `ustad.socket`")
            && stderr.contains("defined: http")
            && stderr.contains("FileDescriptorName="),
        "{stderr}"
    );
    assert!(
        !cluster.events().iter().any(|e| e.is("spawned")),
        "no worker started"
    );
}

/// Reads datagrams until one carries a state change (`READY=1`, `RELOADING=1`,
/// `STOPPING=1`), skipping `STATUS=`-only ones; returns that line and the whole datagram.
fn next_state(manager: &UnixDatagram, deadline: Instant) -> (String, String) {
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no state change from ustad in time");
        manager.set_read_timeout(Some(left)).unwrap();
        let n = manager
            .recv(&mut buffer)
            .unwrap_or_else(|e| panic!("no datagram from ustad in time ({e})"));
        let datagram = String::from_utf8(buffer[..n].to_vec()).unwrap();
        if let Some(state) = datagram
            .lines()
            .find(|line| ["READY=1", "RELOADING=1", "STOPPING=1"].contains(line))
        {
            return (state.to_owned(), datagram);
        }
    }
}

#[test]
fn ustad_reports_ready_reloading_ready_stopping_on_its_notify_socket_and_around_an_upgrade() {
    let dir: TempDir = tempfile::tempdir().unwrap();
    let path = dir.path().join("systemd-notify");
    let manager = UnixDatagram::bind(&path).unwrap();
    std::fs::write(
        dir.path().join("ustad.toml"),
        format!(
            "[pools.web]\ncommand = [\"{}\", \"--ready-after\", \"200\"]\nsize = 2\nready = \"notify\"\n",
            test_worker()
        ),
    )
    .unwrap();
    let mut cluster = Cluster::start_with_env(
        ustad(),
        &["run", "ustad.toml"],
        dir.path(),
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let deadline = Instant::now() + TIMEOUT;

    let (state, datagram) = next_state(&manager, deadline);
    assert_eq!(state, "READY=1", "{datagram}");
    // Both workers are ready by now (their events may still be in the log pipe).
    cluster.wait_events(|e| e.is("ready"), 2, TIMEOUT);

    cluster.signal(Signal::HUP).unwrap();
    let (state, datagram) = next_state(&manager, deadline);
    assert_eq!(state, "RELOADING=1", "{datagram}");
    assert!(
        datagram.lines().any(|line| line
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|usec| usec.parse::<u64>().is_ok())),
        "Type=notify-reload needs MONOTONIC_USEC: {datagram}"
    );
    let (state, datagram) = next_state(&manager, deadline);
    assert_eq!(state, "READY=1", "{datagram}");
    cluster.wait_event(|e| e.is("rollout_finished"), TIMEOUT);

    // An upgrade of ustad itself (SIGURG): the old program says RELOADING=1, the new one
    // READY=1 once it has taken over.
    cluster.signal(Signal::URG).unwrap();
    let (state, datagram) = next_state(&manager, deadline);
    assert_eq!(state, "RELOADING=1", "{datagram}");
    let (state, datagram) = next_state(&manager, deadline);
    assert_eq!(state, "READY=1", "{datagram}");
    let upgraded = cluster.wait_event(|e| e.is("upgraded"), TIMEOUT);
    assert_eq!(upgraded.u64("workers"), Some(2), "{upgraded}");

    cluster.signal(Signal::TERM).unwrap();
    let (state, datagram) = next_state(&manager, deadline);
    assert_eq!(state, "STOPPING=1", "{datagram}");
    assert_eq!(cluster.wait_exit(TIMEOUT).code(), Some(0));
}

/// Reads datagrams from ustad until `done` says so, keeping each `FDSTORE=1` fd under its
/// `FDNAME=`, as systemd's fd store does; returns every datagram's text.
fn receive_store(
    manager: &UnixDatagram,
    store: &mut Vec<(String, OwnedFd)>,
    done: impl Fn(&[String], &[(String, OwnedFd)]) -> bool,
) -> Vec<String> {
    use std::mem::MaybeUninit;

    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let deadline = Instant::now() + TIMEOUT;
    let mut texts = Vec::new();
    while !done(&texts, store) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "not done in time; received {texts:?}");
        manager.set_read_timeout(Some(left)).unwrap();
        let mut buffer = [0u8; 4096];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [std::io::IoSliceMut::new(&mut buffer)];
        let received = rustix::net::recvmsg(manager, &mut iov, &mut control, RecvFlags::empty())
            .unwrap_or_else(|e| panic!("no datagram from ustad in time ({e}); {texts:?}"));
        let mut fds: Vec<OwnedFd> = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(passed) = message {
                fds.extend(passed);
            }
        }
        let text = String::from_utf8(buffer[..received.bytes].to_vec()).unwrap();
        let name = text
            .lines()
            .find_map(|line| line.strip_prefix("FDNAME="))
            .map(str::to_owned);
        if text.lines().any(|line| line == "FDSTORE=1") {
            let name = name.clone().expect("FDSTORE=1 comes with FDNAME=");
            // systemd ignores a copy of an fd it keeps.
            for fd in fds {
                if !store.iter().any(|(_, kept)| same_socket(kept, &fd)) {
                    store.push((name.clone(), fd));
                }
            }
        }
        if text.lines().any(|line| line == "FDSTOREREMOVE=1") {
            let name = name.expect("FDSTOREREMOVE=1 comes with FDNAME=");
            store.retain(|(kept, _)| *kept != name);
        }
        texts.push(text);
    }
    texts
}

/// [`receive_store`] until ustad says `READY=1`.
fn receive_store_until_ready(
    manager: &UnixDatagram,
    store: &mut Vec<(String, OwnedFd)>,
) -> Vec<String> {
    receive_store(manager, store, |texts, _| {
        texts.iter().any(|text| text.starts_with("READY=1"))
    })
}

/// The names in the store, sorted.
fn stored_names(store: &[(String, OwnedFd)]) -> Vec<&str> {
    let mut names: Vec<&str> = store.iter().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    names
}

/// What the test's configuration keeps in the store: `http`, and `spread`'s two slots.
const ALL_STORED: [&str; 3] = ["ustad/http", "ustad/spread/web/0", "ustad/spread/web/1"];

fn same_socket(a: &OwnedFd, b: &OwnedFd) -> bool {
    let (a, b) = (rustix::fs::fstat(a).unwrap(), rustix::fs::fstat(b).unwrap());
    (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
}

#[test]
fn a_killed_primary_restarted_with_its_fd_store_refuses_no_connection_and_serves_the_queued_ones() {
    let dir = tempfile::tempdir().unwrap();
    let manager_path = dir.path().join("systemd-notify");
    let manager = UnixDatagram::bind(&manager_path).unwrap();
    let worker = test_worker();
    std::fs::write(
        dir.path().join("ustad.toml"),
        format!(
            r#"
[sockets.http]
listen = "127.0.0.1:0"

[sockets.spread]
listen = "127.0.0.1:0"
mode = "reuseport"

[pools.web]
command = ["{worker}", "--serve-http"]
size = 2
sockets = ["http", "spread"]
ready = "notify"
"#
        ),
    )
    .unwrap();
    let runtime_dir = dir.path().to_str().unwrap();
    let env = [
        ("NOTIFY_SOCKET", manager_path.to_str().unwrap()),
        ("FDSTORE", "16"),
        ("XDG_RUNTIME_DIR", runtime_dir),
    ];
    let mut first = Cluster::start_with_env(ustad(), &["run", "ustad.toml"], dir.path(), &env);
    let mut store = Vec::new();
    let texts = receive_store_until_ready(&manager, &mut store);
    assert_eq!(stored_names(&store), ALL_STORED, "{texts:?}");
    // One worker fewer (SIGTTOU): its slot's socket closes, and leaves the store.
    first.signal(Signal::TTOU).unwrap();
    let texts = receive_store(&manager, &mut store, |_, store| store.len() == 2);
    assert!(
        texts
            .iter()
            .any(|text| text == "FDSTOREREMOVE=1\nFDNAME=ustad/spread/web/1\n"),
        "{texts:?}"
    );
    let address = first.listen_addr("http");
    let (status, headers, _) = ustad_testkit::load::get(address).unwrap();
    assert_eq!(status, 200);
    let before: u32 = headers["x-worker-pid"].parse().unwrap();

    // The primary dies; its guard stops the workers. Only the store holds the sockets now.
    first.signal(Signal::KILL).unwrap();
    first.wait_exit(TIMEOUT);
    assert!(
        ustad_testkit::process::wait_dead(before, TIMEOUT),
        "the workers die with the primary"
    );
    let mut waiting = TcpStream::connect(address).expect("not refused while no primary runs");
    waiting
        .write_all(b"GET / HTTP/1.1\r\nHost: ustad\r\nConnection: close\r\n\r\n")
        .unwrap();

    // systemd restarts it with the store's fds (in no particular order).
    store.reverse();
    let passed: Vec<(&str, OwnedFd)> = store
        .iter()
        .map(|(name, fd)| (name.as_str(), fd.try_clone().unwrap()))
        .collect();
    let mut second = start_activated(dir.path(), passed, &env);
    // Two taken back; the configuration's second slot of `spread` is bound anew.
    let taken = second.wait_events(|e| e.is("taken_from_store"), 2, TIMEOUT);
    assert!(
        !second.events().iter().any(|e| e.is("dropped_from_store")),
        "{taken:?}"
    );
    assert_eq!(second.listen_addr("http"), address);
    waiting.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut answer = String::new();
    waiting.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the connection queued while no primary ran is served: {answer:?}"
    );
    let texts = receive_store_until_ready(&manager, &mut store);
    assert_eq!(
        stored_names(&store),
        ALL_STORED,
        "the same sockets stored once, and the new one: {texts:?}"
    );
    second.signal(Signal::TERM).unwrap();
    assert_eq!(second.wait_exit(TIMEOUT).code(), Some(0));
}

#[test]
fn a_reload_that_removes_a_socket_systemd_passed_is_refused_and_the_socket_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = http.local_addr().unwrap();
    let worker = test_worker();
    let with_http = format!(
        "[sockets.http]\nlisten = \"127.0.0.1:0\"\n[pools.web]\ncommand = [\"{worker}\", \"--serve-http\"]\nsockets = [\"http\"]\nready = \"notify\"\n"
    );
    std::fs::write(dir.path().join("ustad.toml"), &with_http).unwrap();
    let runtime_dir = dir.path().to_str().unwrap();
    let env = [("XDG_RUNTIME_DIR", runtime_dir)];
    let mut cluster = start_activated(dir.path(), vec![("http", http.into())], &env);
    cluster.wait_events(|e| e.is("ready"), 1, TIMEOUT);

    std::fs::write(
        dir.path().join("ustad.toml"),
        format!("[pools.web]\ncommand = [\"{worker}\"]\nready = \"none\"\n"),
    )
    .unwrap();
    let refused = crate::util::client_in(dir.path(), &["reload"], &env);
    assert_ne!(refused.code, Some(0), "{refused:#?}");
    assert!(
        refused.stderr.contains(
            "socket `http` was passed by the service manager (socket activation), and its socket unit would go on listening"
        ),
        "{refused:#?}"
    );
    let (status, _, _) = ustad_testkit::load::get(address).unwrap();
    assert_eq!(status, 200, "the socket and its workers serve as before");
    assert!(!cluster.events().iter().any(|e| e.is("socket_closed")));

    cluster.signal(Signal::TERM).unwrap();
    assert_eq!(cluster.wait_exit(TIMEOUT).code(), Some(0));
}
