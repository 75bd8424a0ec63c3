//! Apps that bind their own port (`app.listen(3000)`), unchanged: with ustad's defaults every
//! worker that binds an address of its pool gets ustad's socket through the preload library,
//! is seen listening on it, and serves from it, through rolling restarts; everything else they
//! bind or connect is theirs, untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use ustad_testkit::Signal;
use ustad_testkit::cluster::LogEvent;
use ustad_testkit::load::{self, LoadOptions};

use crate::util::{Run, TIMEOUT, live_pids, pid, test_worker};

fn fixture(name: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", name]
        .iter()
        .collect();
    path.to_string_lossy().into_owned()
}

/// Sends requests (a new connection each) until `count` distinct processes have answered,
/// or `TIMEOUT`; returns the answers by pid. No request may fail.
fn answers_from(addr: SocketAddr, count: usize) -> BTreeMap<u32, u64> {
    let deadline = Instant::now() + TIMEOUT;
    let mut by_pid = BTreeMap::new();
    while by_pid.len() < count && Instant::now() < deadline {
        let mut options = LoadOptions::new(addr);
        options.keep_alive = false;
        options.max_requests = Some(60);
        let report = load::start(options).wait();
        assert_eq!(report.failed, 0, "{report}");
        for (pid, n) in report.by_pid {
            *by_pid.entry(pid).or_insert(0) += n;
        }
    }
    assert!(by_pid.len() >= count, "answers by pid: {by_pid:?}");
    by_pid
}

/// The processes seen listening on socket `listen` by the primary, one per worker.
fn seen_listening(run: &Run, workers: usize) -> Vec<LogEvent> {
    let seen = run.cluster.wait_events(
        |e| e.is("listening") && e.str("pool").is_some(),
        workers,
        TIMEOUT,
    );
    for event in &seen {
        assert_eq!(event.str("socket"), Some("listen"), "{event}");
    }
    seen
}

fn process(event: &LogEvent) -> u32 {
    event
        .u64("process")
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("no process in {event}"))
}

/// `ustad run -w 2 -l 127.0.0.1:0 <extra…> -- <command…>` with ustad's defaults: both workers
/// are ready (seen listening, on ustad's socket), and both answer on ustad's address.
fn two_workers_serve(extra: &[&str], command: &[&str]) -> Run {
    let mut args = vec!["run", "-w", "2", "-l", "127.0.0.1:0"];
    args.extend(extra);
    args.push("--");
    args.extend(command);
    let run = Run::start(&args);
    run.wait_ready(2);
    let listening: BTreeSet<u32> = seen_listening(&run, 2).iter().map(process).collect();
    let answered = answers_from(run.addr("listen"), 2);
    let answered: BTreeSet<u32> = answered.into_keys().collect();
    assert_eq!(answered, listening, "the processes seen listening answered");
    assert!(
        !run.cluster.events().iter().any(|e| e.is("address_in_use")),
        "no worker found its address in use"
    );
    run
}

#[test]
fn node_listening_on_port_is_served_by_every_worker_from_ustads_socket() {
    let mut run = two_workers_serve(&[], &["node", &fixture("self_bind.js")]);
    // Ready by `listening` (ustad's default with a socket): each worker itself was seen
    // waiting on ustad's socket, in the fd its own bind got.
    let ready = run.wait_ready(2);
    for (listening, ready) in seen_listening(&run, 2).iter().zip(&ready) {
        assert_eq!(listening.u64("id"), ready.u64("id"));
        assert_eq!(process(listening), pid(ready), "{listening}");
        assert_eq!(listening.str("how"), Some("epoll"), "{listening}");
    }
    // PORT was ustad's port, and the app says it listens where ustad does.
    let port = run.addr("listen").port();
    let line = run
        .cluster
        .wait_stdout_line(|l| l.contains("listening on"), TIMEOUT);
    assert!(
        line.contains(&format!(
            "\"address\":\"127.0.0.1\",\"family\":\"IPv4\",\"port\":{port}"
        )),
        "{line}"
    );
    run.stop();
}

#[test]
fn node_listening_on_port_and_localhost_gets_ustads_socket_whichever_family_it_resolves() {
    let mut run = two_workers_serve(&[], &["node", &fixture("self_bind.js"), "localhost"]);
    run.stop();
}

#[test]
fn python_http_server_on_host_and_port_is_served_by_every_worker() {
    let mut run = two_workers_serve(
        &[],
        &["python3", &fixture("self_bind.py"), "http", "127.0.0.1"],
    );
    run.stop();
}

#[test]
fn a_rust_program_binding_with_std_gets_ustads_socket() {
    // --never-ready: no READY=1, so that it is ready when seen listening, as a program that
    // knows nothing of ustad.
    let worker = test_worker();
    let mut run = two_workers_serve(
        &[],
        &[
            &worker,
            "--never-ready",
            "--serve-http",
            "--bind",
            "127.0.0.1:{port}",
        ],
    );
    run.stop();
}

#[test]
fn a_server_started_by_a_launcher_like_npm_gets_the_socket() {
    // `npm start`: a Node process that starts the server as its child, which inherits fd 3
    // and the environment but has another pid than LISTEN_PID.
    let mut run = two_workers_serve(&[], &["node", &fixture("self_bind.js"), "spawn"]);
    let launchers: BTreeSet<u32> = live_pids(&run.cluster.events(), "app")
        .into_values()
        .collect();
    let servers: BTreeSet<u32> = seen_listening(&run, 2).iter().map(process).collect();
    assert!(launchers.is_disjoint(&servers), "the children serve");
    run.stop();
    // And through a shell that stays.
    let script = format!("node {} ; exit $?", fixture("self_bind.js"));
    let mut run = two_workers_serve(&[], &["sh", "-c", &script]);
    run.stop();
}

#[test]
fn workers_of_another_user_that_bind_their_own_port_get_ustads_socket() {
    // They may not open the root primary's memfd through /proc: they load a copy anyone may
    // read.
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run workers as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("ustad-preload-users-")
        .tempdir()
        .expect("a temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let app = dir.path().join("self_bind.js");
    std::fs::copy(fixture("self_bind.js"), &app).expect("copying the app");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cwd = dir.path().to_str().expect("UTF-8").to_owned();
    let mut run = two_workers_serve(
        &["--user", "nobody", "--cwd", &cwd],
        &["node", "self_bind.js"],
    );
    for worker in live_pids(&run.cluster.events(), "app").into_values() {
        let status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(uid.ends_with("65534\t65534\t65534\t65534"), "{uid}");
    }
    assert!(
        !run.cluster
            .stderr_lines()
            .iter()
            .any(|l| l.contains("cannot be preloaded")),
        "the loader found the library"
    );
    run.stop();
}

#[test]
fn reuseport_workers_each_get_their_slots_socket_even_with_so_reuseport_set() {
    // Each worker is seen listening on its own slot's socket (a socket of its own, which
    // SO_REUSEPORT would let it bind beside ustad's, would never be seen): the program's bind
    // got the slot's socket.
    let mut run = two_workers_serve(
        &["--reuseport"],
        &[
            "python3",
            &fixture("self_bind.py"),
            "http",
            "127.0.0.1",
            "reuseport",
        ],
    );
    run.stop();
}

#[test]
fn a_rolling_restart_of_a_self_binding_app_under_load_loses_nothing() {
    let worker = test_worker();
    let mut run = two_workers_serve(
        &[],
        &[
            &worker,
            "--never-ready",
            "--serve-http",
            "--bind",
            "0.0.0.0:{port}",
        ],
    );
    let first: BTreeSet<u32> = live_pids(&run.cluster.events(), "app")
        .into_values()
        .collect();
    let mut options = LoadOptions::new(run.addr("listen"));
    options.connections = 8;
    options.max_duration = Duration::from_secs(60);
    let load = load::start(options);
    assert!(load.wait_for_ok(200, TIMEOUT), "{}", load.snapshot());
    for round in 0..3 {
        let since = run.cluster.event_count();
        run.cluster.signal(Signal::HUP).expect("SIGHUP");
        run.cluster
            .wait_event_since(since, |e| e.is("rollout_finished"), TIMEOUT);
        run.cluster
            .wait_events(|e| e.is("exited"), 2 * (round + 1), TIMEOUT);
        let served = load.snapshot().ok;
        assert!(load.wait_for_ok(served + 300, TIMEOUT), "round {round}");
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report}");
    let last: BTreeSet<u32> = live_pids(&run.cluster.events(), "app")
        .into_values()
        .collect();
    assert!(last.is_disjoint(&first), "every worker was replaced");
    assert!(
        last.iter().any(|p| report.by_pid.contains_key(p)),
        "{report}"
    );
    run.stop();
}

/// Runs the probe (`self_bind.py probe`) as the only worker of a pool on `listen`, and returns
/// its report.
fn probe(listen: &str) -> (Run, Value) {
    let run = Run::start(&[
        "run",
        "-l",
        listen,
        "--ready",
        "none",
        "--",
        "python3",
        &fixture("self_bind.py"),
        "probe",
    ]);
    let line = run
        .cluster
        .wait_stdout_line(|l| l.contains("PROBE "), TIMEOUT);
    let json = line.split_once("PROBE ").expect("the marker").1;
    let report: Value = serde_json::from_str(json).expect("the probe's JSON");
    (run, report)
}

fn ours(report: &Value, case: &str) -> bool {
    report[case]["ours"]
        .as_bool()
        .unwrap_or_else(|| panic!("{case}: {}", report[case]))
}

#[test]
fn addresses_that_name_ustads_socket_get_it_and_nothing_else_does() {
    let (mut run, report) = probe("127.0.0.1:0");
    let declared = run.addr("listen");
    let name = serde_json::json!(["127.0.0.1", declared.port()]);
    assert_eq!(report["port"], declared.port(), "PORT is ustad's port");
    for case in [
        "ipv4",
        "any_ipv4",
        "any_ipv6",
        "mapped",
        "loopback_ipv6",
        "localhost",
        "reuse_options",
    ] {
        assert!(ours(&report, case), "{case}: {}", report[case]);
        // getsockname says where ustad listens, whatever the program asked for.
        assert_eq!(report[case]["name"], name, "{case}");
    }
    for case in ["port_zero", "other_port", "udp"] {
        assert!(!ours(&report, case), "{case}: {}", report[case]);
    }
    assert_eq!(
        report["udp"]["name"], name,
        "UDP binds the same port for itself"
    );
    assert_eq!(report["other_port"]["name"], report["port_zero"]["name"]);
    assert!(!ours(&report, "outgoing"), "{}", report["outgoing"]);
    assert_eq!(report["outgoing"]["connected"], true);
    assert_eq!(report["to_declared"]["peer_matches"], true, "{report}");
    run.stop();
}

#[test]
fn the_programs_fd_keeps_its_flags_and_ustads_socket_its_listen_and_backlog() {
    let (mut run, report) = probe("127.0.0.1:0");
    assert_eq!(report["inheritable"]["inheritable"], true, "{report}");
    assert_eq!(report["plain"]["inheritable"], false, "{report}");
    assert_eq!(report["nonblocking"]["nonblocking"], true, "{report}");
    // listen(1) left the pool's backlog; shutdown() left the socket listening.
    let listen = &report["listen"];
    assert_eq!(
        listen["backlog_after"], listen["backlog_before"],
        "{report}"
    );
    assert_ne!(listen["backlog_after"], 1, "{report}");
    assert_eq!(report["shutdown"]["listening"], 1, "{report}");
    // Closing every copy, binding again, and a second bind while one is open: the same socket.
    assert!(ours(&report, "after_close"));
    assert!(ours(&report, "plain") && ours(&report, "ipv4"));
    // After listen() and shutdown(), a connection to the address still reached the socket.
    assert_eq!(report["to_declared"]["peer_matches"], true, "{report}");
    run.stop();
}

#[test]
fn a_program_that_unsets_ld_preload_keeps_its_socket_and_its_later_children_do_without() {
    let (mut run, report) = probe("127.0.0.1:0");
    assert!(
        ours(&report, "child"),
        "a child keeping LD_PRELOAD: {}",
        report["child"]
    );
    assert!(ours(&report, "after_unsetenv"), "{report}");
    assert!(!ours(&report, "child_without_preload"), "{report}");
    assert_eq!(report["child_without_preload"]["code"], 1, "EADDRINUSE");
    run.stop();
}

/// `GET /` over a Unix socket; the `X-Worker-Pid` of the answer.
fn get_unix(path: &Path) -> u32 {
    let mut stream = std::os::unix::net::UnixStream::connect(path).expect("connecting");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("a read timeout");
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("a request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("a response");
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    response
        .lines()
        .find_map(|l| l.strip_prefix("X-Worker-Pid: "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no X-Worker-Pid in {response}"))
}

#[test]
fn a_unix_socket_app_that_removes_the_path_first_serves_from_ustads_socket() {
    // From a config file, with ustad's defaults, and the app given a path of its own spelling.
    let config = format!(
        "[sockets.listen]\nlisten = \"unix:app.sock\"\n\n[pools.web]\ncommand = [\"python3\", \"{}\", \"unix\", \"./link/app.sock\"]\nsize = 2\nsockets = [\"listen\"]\n",
        fixture("self_bind.py")
    );
    let dir = tempfile::tempdir().expect("a temp dir");
    std::os::unix::fs::symlink(dir.path(), dir.path().join("link")).expect("a symlink");
    std::fs::write(dir.path().join("ustad.toml"), config).expect("ustad.toml");
    let cluster = ustad_testkit::cluster::Cluster::start(
        crate::util::ustad(),
        &["run", "ustad.toml"],
        dir.path(),
    );
    let mut run = Run { dir, cluster };
    run.wait_ready(2);
    let listening: BTreeSet<u32> = seen_listening_on(&run, "listen", 2);
    let path = run.path("app.sock");
    let deadline = Instant::now() + TIMEOUT;
    let mut answered = BTreeSet::new();
    while answered.len() < 2 && Instant::now() < deadline {
        answered.insert(get_unix(&path));
    }
    assert_eq!(answered, listening);
    // The app's unlink() left ustad's socket file where it was.
    let line = run
        .cluster
        .wait_stdout_line(|l| l.contains("listening on"), TIMEOUT);
    assert!(line.contains("(exists: True)"), "{line}");
    assert!(std::fs::symlink_metadata(&path).is_ok());
    run.stop();
}

fn seen_listening_on(run: &Run, socket: &str, workers: usize) -> BTreeSet<u32> {
    run.cluster
        .wait_events(
            |e| e.is("listening") && e.str("pool").is_some() && e.str("socket") == Some(socket),
            workers,
            TIMEOUT,
        )
        .iter()
        .map(process)
        .collect()
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// Starts `run <args…>` with `PORT` set for the workers, and waits for the hint that a worker
/// found its address in use.
fn hint(args: &[&str], port: u16) -> (Run, LogEvent) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let port = port.to_string();
    let cluster = ustad_testkit::cluster::Cluster::start_with_env(
        crate::util::ustad(),
        args,
        dir.path(),
        &[("PORT", &port)],
    );
    let run = Run { dir, cluster };
    let event = run.cluster.wait_event(|e| e.is("address_in_use"), TIMEOUT);
    (run, event)
}

#[test]
fn with_preload_off_a_self_binding_app_fails_and_the_log_says_what_to_do() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (mut run, event) = hint(
        &[
            "run",
            "-w",
            "2",
            "-l",
            &listen,
            "--no-preload",
            "--ready",
            "none",
            "--",
            "node",
            &fixture("self_bind.js"),
        ],
        port,
    );
    let message = event.str("message").expect("a message");
    assert!(message.contains("preload = false"), "{message}");
    assert!(message.contains(&listen), "{message}");
    assert!(message.contains("go-systemd"), "{message}");
    assert!(
        event.str("line").is_some_and(|l| l.contains("EADDRINUSE")),
        "{event}"
    );
    // Once per pool, however often the workers fail.
    run.stop();
    let hints = run
        .cluster
        .events()
        .iter()
        .filter(|e| e.is("address_in_use"))
        .count();
    assert_eq!(hints, 1);
}

#[test]
fn workers_of_a_pool_without_sockets_that_share_a_port_are_told_to_let_ustad_hold_it() {
    // The first report: `PORT=3000 ustad run -w 2 -- node app.js`.
    let (mut run, event) = hint(
        &["run", "-w", "2", "--", "node", &fixture("self_bind.js")],
        free_port(),
    );
    let message = event.str("message").expect("a message");
    assert!(message.contains("--listen 127.0.0.1:3000"), "{message}");
    run.stop();
}
