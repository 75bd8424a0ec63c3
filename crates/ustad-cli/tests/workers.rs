//! What a worker receives: sockets at fd 3… with `LISTEN_*` (strictly: `LISTEN_PID` is its
//! own pid), identity variables, `/dev/null` stdin, its own process group, no leaked fds, and
//! its output relayed with a prefix.

use std::collections::BTreeSet;

use ustad_testkit::load::{self, LoadOptions};
use ustad_testkit::report::{Take, WorkerReport};

use crate::util::{Run, TIMEOUT, pid, test_worker};

#[test]
fn workers_get_their_sockets_at_fd_3_with_their_own_pid_as_listen_pid() {
    let worker = test_worker();
    let mut run = Run::start(&[
        "run",
        "-w",
        "3",
        "-l",
        "127.0.0.1:0",
        "-l",
        "admin=127.0.0.1:0",
        "--ready",
        "notify",
        "--",
        &worker,
        "--report",
        "report-{index}.json",
    ]);
    let http = run.addr("listen");
    let admin = run.addr("admin");
    let ready = run.wait_ready(3);
    let mut ids = BTreeSet::new();
    let mut pids = BTreeSet::new();
    for index in 0..3 {
        let report = WorkerReport::wait_for(&run.path(&format!("report-{index}.json")), TIMEOUT);
        assert_eq!(report.env("LISTEN_FDS"), Some("2"));
        assert_eq!(
            report.env("LISTEN_PID"),
            Some(report.pid.to_string().as_str()),
            "LISTEN_PID is the worker's own pid"
        );
        assert_eq!(report.env("LISTEN_FDNAMES"), Some("listen:admin"));
        assert_eq!(report.env("USTAD_POOL"), Some("app"));
        assert_eq!(
            report.env("USTAD_WORKER_INDEX"),
            Some(index.to_string().as_str())
        );
        assert!(
            report
                .env("NOTIFY_SOCKET")
                .is_some_and(|p| p.ends_with("notify.sock"))
        );
        ids.insert(report.env("USTAD_WORKER_ID").unwrap().to_owned());
        pids.insert(report.pid);

        let addresses: Vec<_> = report
            .listen_fds
            .iter()
            .map(|fd| (fd.fd, fd.listening, fd.local_socket_addr()))
            .collect();
        assert_eq!(addresses, [(3, true, Some(http)), (4, true, Some(admin))]);
        // The strict reader (sd_listen_fds semantics) and the relaxed one both see them.
        assert_eq!(
            report.sd_notify_listen_fds,
            Some(vec![3, 4]),
            "sd-notify: {:?}",
            report.sd_notify_error
        );
        assert_eq!(report.listenfd_count, 2);
        assert_eq!(report.listenfd_tcp_listener_0, Take::Ok);

        assert!(report.stdin_is_dev_null, "stdin: {:?}", report.stdin_target);
        assert_eq!(
            report.pgid, report.pid,
            "each worker leads its own process group"
        );
        assert_eq!(report.ppid, run.cluster.pid());
        let leaked: Vec<_> = report.open_fds.iter().filter(|fd| fd.fd > 4).collect();
        assert!(leaked.is_empty(), "fds leaked into the worker: {leaked:?}");
    }
    assert_eq!(ids.len(), 3, "worker ids are unique");
    let ready_pids: BTreeSet<u32> = ready.iter().map(pid).collect();
    assert_eq!(ready_pids, pids, "the ready events name the workers' pids");
    run.stop();
}

#[test]
fn requests_reach_more_than_one_worker_through_the_shared_socket() {
    let mut run = Run::start(&[
        "run",
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--",
        &test_worker(),
        "--serve-http",
    ]);
    let addr = run.addr("listen");
    let workers: BTreeSet<u32> = run.wait_ready(2).iter().map(pid).collect();
    // New connections, several at a time, until both workers have answered (bounded).
    let mut options = LoadOptions::new(addr);
    options.connections = 8;
    options.keep_alive = false;
    options.max_requests = Some(4000);
    let load = load::start(options);
    let mut seen = BTreeSet::new();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while seen.len() < 2 && std::time::Instant::now() < deadline && !load.is_finished() {
        seen.extend(load.snapshot().by_pid.keys().copied());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report}");
    let answered: BTreeSet<u32> = report.by_pid.keys().copied().collect();
    assert_eq!(answered, workers, "every worker answered: {report}");
    run.stop();
}

#[test]
fn reuseport_gives_each_slot_its_own_socket_on_one_port() {
    let worker = test_worker();
    let mut run = Run::start(&[
        "run",
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--reuseport",
        "--",
        &worker,
        "--serve-http",
        "--report",
        "report-{index}.json",
    ]);
    let addr = run.addr("listen");
    run.wait_ready(2);
    let reports: Vec<WorkerReport> = (0..2)
        .map(|i| WorkerReport::wait_for(&run.path(&format!("report-{i}.json")), TIMEOUT))
        .collect();
    for report in &reports {
        assert_eq!(report.listen_fds[0].local_socket_addr(), Some(addr));
    }
    // Distinct sockets: the kernel spreads connections over them by hash.
    let mut options = LoadOptions::new(addr);
    options.connections = 16;
    options.max_requests = Some(2000);
    let report = load::start(options).wait();
    assert_eq!(report.failed, 0, "{report}");
    assert_eq!(
        report.by_pid.len(),
        2,
        "both slots' sockets get connections: {report}"
    );
    run.stop();
}

#[test]
fn a_unix_socket_is_passed_like_a_tcp_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    let listen = format!("unix:{}", path.display());
    let mut run = Run::start(&["run", "-l", &listen, "--", &test_worker(), "--serve-http"]);
    run.wait_ready(1);
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    run.stop();
    assert!(
        !path.exists(),
        "the socket file is removed when ustad exits"
    );
}

#[test]
fn output_is_relayed_line_by_line_with_the_pool_and_slot() {
    let mut run = Run::start(&["run", "-w", "2", "--pool", "jobs", "--", &test_worker()]);
    let ready = run.wait_ready(2);
    for event in &ready {
        let slot = event.u64("slot").unwrap();
        let id = event.u64("id").unwrap();
        let expected_out = format!("jobs.{slot} | test-worker {id} started pid={}", pid(event));
        run.cluster
            .wait_stdout_line(|line| line == expected_out, TIMEOUT);
        let expected_err = format!("jobs.{slot} | test-worker {id} stderr pid={}", pid(event));
        run.cluster
            .wait_stderr_line(|line| line == expected_err, TIMEOUT);
    }
    run.stop();
}

#[test]
fn silent_pools_relay_nothing() {
    let mut run = Run::start(&["run", "--silent", "--", &test_worker()]);
    run.wait_ready(1);
    run.stop();
    assert!(
        run.cluster
            .stdout_lines()
            .iter()
            .all(|line| !line.contains("test-worker")),
        "{:?}",
        run.cluster.stdout_lines()
    );
}

#[test]
fn a_worker_flooding_its_stdout_does_not_grow_the_primary() {
    let mut run = Run::start(&["run", "-w", "2", "--", &test_worker(), "--flood-stdout"]);
    run.wait_ready(2);
    let primary = run.cluster.pid();
    let rss = || ustad_core::procfs::rss_bytes(primary).expect("primary alive");
    // Let the flood run through many megabytes (and several 1 MiB lines without a newline).
    run.cluster
        .wait_stdout_line(|line| line.len() >= 8 * 1024, TIMEOUT);
    let first = rss();
    let start = std::time::Instant::now();
    let mut peak = first;
    while start.elapsed() < std::time::Duration::from_secs(3) {
        peak = peak.max(rss());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The relay holds at most 256 lines of at most 8 KiB between readers and writer.
    assert!(
        peak < first + (16 << 20),
        "primary RSS grew from {} KiB to {} KiB while relaying a flood",
        first >> 10,
        peak >> 10
    );
    run.stop();
}

/// The primary holds the listening socket while a worker restarts, so a connection made while
/// no worker is running is queued by the kernel and answered by the replacement, not refused.
fn a_connection_made_while_the_only_worker_restarts_is_served(reuseport: bool) {
    let worker = test_worker();
    let mut args = vec![
        "run",
        "-l",
        "127.0.0.1:0",
        "--restart-delay",
        "500ms",
        "--ready",
        "notify",
    ];
    if reuseport {
        args.push("--reuseport");
    }
    args.extend(["--", &worker, "--serve-http"]);
    let mut run = Run::start(&args);
    let addr = run.addr("listen");
    let first = pid(&run.wait_ready(1)[0]);
    let victim = rustix::process::Pid::from_raw(first as i32).unwrap();
    rustix::process::kill_process(victim, ustad_testkit::Signal::KILL).unwrap();
    run.cluster
        .wait_event(|e| e.is("restart_scheduled"), TIMEOUT);
    // No worker is running now; the replacement starts in about 500 ms.
    let (status, headers, _) = load::get(addr).expect("the request is queued, not refused");
    assert_eq!(status, 200);
    let answered_by: u32 = headers["x-worker-pid"].parse().unwrap();
    let replacement = run
        .cluster
        .wait_event(|e| e.is("ready") && e.u64("id") == Some(2), TIMEOUT);
    assert_eq!(answered_by, pid(&replacement));
    run.stop();
}

#[test]
fn a_connection_made_while_the_only_worker_restarts_is_served_shared() {
    a_connection_made_while_the_only_worker_restarts_is_served(false);
}

#[test]
fn a_connection_made_while_the_only_worker_restarts_is_served_reuseport() {
    a_connection_made_while_the_only_worker_restarts_is_served(true);
}
