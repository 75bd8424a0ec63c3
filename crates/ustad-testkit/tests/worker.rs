//! `test-worker`'s modes, run directly (no ustad).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use ustad_testkit::Signal;
use ustad_testkit::load::{self, LoadOptions};
use ustad_testkit::report::{Take, WorkerReport};

use crate::util::{NotifySocket, Spawn, fd_of, listener, spawn_worker};

const T: Duration = Duration::from_secs(20);

#[test]
fn report_shows_what_the_worker_received() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("report-{pid}.json");
    let listener = listener();
    let addr = listener.local_addr().unwrap();
    let mut worker = spawn_worker(Spawn {
        args: &[
            "--never-ready",
            "--report",
            template.to_str().unwrap(),
            "--env-report",
            "EXTRA",
        ],
        env: &[
            ("LISTEN_FDNAMES", "web"),
            ("USTAD_POOL", "web"),
            ("USTAD_WORKER_ID", "web.0"),
            ("USTAD_WORKER_INDEX", "0"),
            ("EXTRA", "extra value"),
        ],
        fds: vec![fd_of(&listener)],
        listen_pid: true,
        pipe_stdout: true,
    });
    let pid = worker.pid();
    let report = WorkerReport::wait_for(&dir.path().join(format!("report-{pid}.json")), T);

    // `sh -c 'exec …'` keeps the pid; the guard made it a group leader.
    assert_eq!(report.pid, pid);
    assert_eq!(report.pgid, pid);
    assert_eq!(report.ppid, std::process::id());
    let pid_text = pid.to_string();
    assert_eq!(report.env("LISTEN_PID"), Some(pid_text.as_str()));
    assert_eq!(report.env("LISTEN_FDS"), Some("1"));
    assert_eq!(report.env("LISTEN_FDNAMES"), Some("web"));
    assert_eq!(report.env("USTAD_WORKER_ID"), Some("web.0"));
    assert_eq!(report.env("USTAD_WORKER_INDEX"), Some("0"));
    assert_eq!(report.env("USTAD_POOL"), Some("web"));
    assert_eq!(report.env("NOTIFY_SOCKET"), None);
    assert_eq!(report.env("EXTRA"), Some("extra value"));

    assert_eq!(report.listen_fds.len(), 1);
    let fd3 = &report.listen_fds[0];
    assert_eq!(fd3.fd, 3);
    assert!(fd3.open && fd3.is_socket && fd3.listening, "{fd3:?}");
    assert_eq!(fd3.socket_type.as_deref(), Some("stream"));
    assert_eq!(fd3.family.as_deref(), Some("inet"));
    assert_eq!(fd3.local_socket_addr(), Some(addr));

    assert_eq!(report.sd_notify_listen_fds, Some(vec![3]));
    assert_eq!(report.sd_notify_error, None);
    assert_eq!(report.listenfd_count, 1);
    assert_eq!(report.listenfd_tcp_listener_0, Take::Ok);
    assert!(report.stdin_is_dev_null, "{:?}", report.stdin_target);
    assert_eq!(report.grandchild_pid, None);
    // Nothing but the socket leaked into the worker.
    assert_eq!(report.open_fd_numbers(), vec![3], "{:?}", report.open_fds);

    let stdout = worker.child_mut().stdout.take().unwrap();
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    assert_eq!(
        first.trim_end(),
        format!("test-worker web.0 started pid={pid}")
    );
}

/// The strict `sd-notify` crate wants `LISTEN_PID`; the relaxed `listenfd` crate accepts it
/// missing. A `LISTEN_PID` naming another process is refused by both.
#[test]
fn strict_and_relaxed_readings_of_listen_pid() {
    let dir = tempfile::tempdir().unwrap();
    let listener = listener();
    for (case, listen_pid) in [("missing", None), ("wrong", Some("1"))] {
        let path = dir.path().join(format!("{case}.json"));
        let env: Vec<(&str, &str)> = listen_pid.map(|p| ("LISTEN_PID", p)).into_iter().collect();
        let _worker = spawn_worker(Spawn {
            args: &["--never-ready", "--report", path.to_str().unwrap()],
            env: &env,
            fds: vec![fd_of(&listener)],
            ..Spawn::default()
        });
        let report = WorkerReport::wait_for(&path, T);
        assert_eq!(report.sd_notify_listen_fds, Some(vec![]), "{case}");
        assert!(report.listen_fds[0].listening, "{case}");
        match case {
            "missing" => {
                assert_eq!(report.listenfd_count, 1);
                assert_eq!(report.listenfd_tcp_listener_0, Take::Ok);
            }
            _ => {
                assert_eq!(report.listenfd_count, 0);
                assert_eq!(report.listenfd_tcp_listener_0, Take::None);
            }
        }
    }
}

#[test]
fn serve_http_answers_with_its_pid_and_exits_on_sigterm() {
    let listener = listener();
    let addr = listener.local_addr().unwrap();
    let mut worker = spawn_worker(Spawn {
        args: &["--serve-http"],
        env: &[("USTAD_WORKER_ID", "web.3")],
        fds: vec![fd_of(&listener)],
        listen_pid: true,
        ..Spawn::default()
    });
    let (status, headers, body) = load::get(addr).unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-worker-pid"], worker.pid().to_string());
    assert_eq!(headers["x-worker-id"], "web.3");
    assert!(body.starts_with("hello from web.3"), "{body}");

    worker.signal(Signal::TERM).unwrap();
    let status = worker
        .wait_timeout(Duration::from_secs(5))
        .expect("exits promptly");
    assert_eq!(status.code(), Some(0));
}

/// A rollout by hand: keep-alive load on one worker, a second worker joins the socket, the first
/// drains. Nothing fails, because a draining worker answers each connection's next request with
/// `Connection: close` instead of closing it under the client.
#[test]
fn a_draining_worker_loses_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let listener = listener();
    let addr = listener.local_addr().unwrap();
    let spawn = |id| {
        let worker = spawn_worker(Spawn {
            args: &["--serve-http"],
            env: &[("USTAD_WORKER_ID", id), ("NOTIFY_SOCKET", notify.path())],
            fds: vec![fd_of(&listener)],
            listen_pid: true,
            ..Spawn::default()
        });
        assert_eq!(notify.recv(), "READY=1\n");
        worker
    };
    let mut old = spawn("web.0");
    let load = load::start(LoadOptions {
        connections: 4,
        max_duration: Duration::from_secs(60),
        ..LoadOptions::new(addr)
    });
    assert!(load.wait_for_ok(200, T), "{}", load.snapshot());
    let before = load.snapshot();
    assert_eq!(
        before.by_pid.keys().collect::<Vec<_>>(),
        [&old.pid()],
        "{before}"
    );

    let new = spawn("web.1");
    old.signal(Signal::TERM).unwrap();
    let status = old.wait_timeout(Duration::from_secs(10)).expect("drains");
    assert_eq!(status.code(), Some(0));
    let after_exit = load.snapshot().ok;
    assert!(load.wait_for_ok(after_exit + 200, T), "{}", load.snapshot());
    let report = load.stop();

    assert_eq!(report.failed, 0, "{report}");
    assert!(report.by_pid[&new.pid()] >= 200, "{report}");
    assert!(
        report.connections_opened >= 8,
        "every connection moved: {report}"
    );
}

#[test]
fn crash_after_exits_with_the_code() {
    let started = Instant::now();
    let mut worker = spawn_worker(Spawn {
        args: &["--crash-after", "100", "--exit-code", "7"],
        ..Spawn::default()
    });
    let status = worker.wait_timeout(T).expect("crashes");
    assert_eq!(status.code(), Some(7));
    assert!(started.elapsed() >= Duration::from_millis(100));

    let mut worker = spawn_worker(Spawn {
        args: &["--crash-after", "0"],
        ..Spawn::default()
    });
    assert_eq!(worker.wait_timeout(T).expect("crashes").code(), Some(1));
}

#[test]
fn ready_and_raw_notifications_arrive_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let started = Instant::now();
    let _worker = spawn_worker(Spawn {
        args: &[
            "--ready-after",
            "150",
            "--notify",
            "STATUS=hello",
            "--notify",
            "USTAD_REQUEST=restart",
        ],
        env: &[("NOTIFY_SOCKET", notify.path())],
        ..Spawn::default()
    });
    assert_eq!(notify.recv(), "READY=1\n");
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(notify.recv(), "STATUS=hello\n");
    assert_eq!(notify.recv(), "USTAD_REQUEST=restart\n");

    let _never = spawn_worker(Spawn {
        args: &["--never-ready", "--notify", "STATUS=not ready"],
        env: &[("NOTIFY_SOCKET", notify.path())],
        ..Spawn::default()
    });
    assert_eq!(notify.recv(), "STATUS=not ready\n");
}

#[test]
fn ignore_term_survives_sigterm_and_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let mut worker = spawn_worker(Spawn {
        args: &["--ignore-term"],
        env: &[("NOTIFY_SOCKET", notify.path())],
        ..Spawn::default()
    });
    // READY=1 comes after the signal handlers are installed.
    assert_eq!(notify.recv(), "READY=1\n");
    worker.signal(Signal::TERM).unwrap();
    worker.signal(Signal::INT).unwrap();
    assert_eq!(worker.wait_timeout(Duration::from_millis(300)), None);
    let status = worker.kill();
    assert_eq!(status.signal(), Some(Signal::KILL.as_raw()));
}

#[test]
fn exit_on_term_after_is_a_slow_drain() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let mut worker = spawn_worker(Spawn {
        args: &["--exit-on-term-after", "300"],
        env: &[("NOTIFY_SOCKET", notify.path())],
        ..Spawn::default()
    });
    assert_eq!(notify.recv(), "READY=1\n");
    let signalled = Instant::now();
    worker.signal(Signal::TERM).unwrap();
    let status = worker.wait_timeout(T).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() >= Duration::from_millis(300));
}

/// The flood includes 1 MiB runs without a newline, and a worker blocked on a full stdout pipe
/// still exits promptly on SIGTERM.
#[test]
fn flood_stdout_writes_long_lines_and_still_stops() {
    let mut worker = spawn_worker(Spawn {
        args: &["--flood-stdout"],
        pipe_stdout: true,
        ..Spawn::default()
    });
    let stdout = worker.child_mut().stdout.take().unwrap();
    let mut reader = BufReader::new(stdout).take(64 * 1024 * 1024);
    let mut line = Vec::new();
    let mut longest = 0;
    let mut short_lines = 0;
    while longest < 1024 * 1024 {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).unwrap();
        assert!(n > 0, "stdout closed");
        if n < 200 {
            short_lines += 1;
        }
        longest = longest.max(n);
    }
    assert!(short_lines >= 100);
    // Stop reading: the pipe fills and the flood thread blocks.
    std::thread::sleep(Duration::from_millis(200));
    worker.signal(Signal::TERM).unwrap();
    let status = worker.wait_timeout(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(0));
    drop(reader);
}

/// A unix listening socket works too, and serving does not depend on `LISTEN_PID` being right
/// (here it names another process, so `listenfd` refuses the fd and the worker uses fd 3 as is).
#[test]
fn serve_http_on_a_unix_socket_with_a_wrong_listen_pid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("web.sock");
    let report_path = dir.path().join("r.json");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let worker = spawn_worker(Spawn {
        args: &["--serve-http", "--report", report_path.to_str().unwrap()],
        env: &[("LISTEN_PID", "1")],
        fds: vec![std::os::fd::OwnedFd::from(listener.try_clone().unwrap())],
        ..Spawn::default()
    });
    let report = WorkerReport::wait_for(&report_path, T);
    assert_eq!(report.listen_fds[0].family.as_deref(), Some("unix"));
    assert_eq!(
        report.listen_fds[0].local_addr.as_deref(),
        path.to_str(),
        "{report:?}"
    );
    assert_eq!(report.listenfd_count, 0);

    let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    stream.set_read_timeout(Some(T)).unwrap();
    std::io::Write::write_all(
        &mut stream,
        b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    let pid_header = format!("x-worker-pid: {}\r\n", worker.pid());
    assert!(
        response.to_ascii_lowercase().contains(&pid_header),
        "{response}"
    );
}
