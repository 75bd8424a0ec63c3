//! Node's own IPC channel (`--ipc node`): an app written for PM2's conventions runs unmodified.

use ustad_testkit::Signal;

use crate::util::{Run, TIMEOUT, fixture, pid};

fn app() -> String {
    fixture("pm2_app.js")
}

fn start(extra: &[&str]) -> Run {
    let app = app();
    let mut args = vec!["run", "-w", "2", "-l", "127.0.0.1:0", "--ipc", "node"];
    args.extend(extra);
    args.extend(["--", "node", &app]);
    Run::start(&args)
}

/// `GET path` on a fresh connection; the pid of the worker that answered 200.
fn get(run: &Run, path: &str) -> u32 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(run.addr("listen")).expect("connecting");
    stream.set_read_timeout(Some(TIMEOUT)).expect("a timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .expect("asking");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("an answer");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("x-worker-pid: ")
                .map(str::to_owned)
        })
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("no X-Worker-Pid in {response}"))
}

#[test]
fn process_send_ready_is_readiness_with_ready_message() {
    let run = start(&["--ready", "message", "-e", "READY_DELAY_MS=600"]);
    let ready = run.wait_ready(2);
    for event in &ready {
        // Listening at once, ready only when it said so.
        assert!(event.u64("after_ms").is_some_and(|ms| ms >= 600), "{event}");
    }
    let mut run = run;
    run.stop();
}

#[test]
fn the_shutdown_message_comes_before_the_signal_and_a_draining_app_exits_on_it() {
    let mut run = start(&["--stop-grace", "10s"]);
    let ready = run.wait_ready(2);
    run.cluster.signal(Signal::HUP).expect("SIGHUP");
    run.cluster
        .wait_event(|e| e.is("rollout_finished"), TIMEOUT);
    let exits = run.cluster.wait_events(|e| e.is("exited"), 2, TIMEOUT);
    for exit in &exits {
        // It has no SIGTERM handler: exit code 0 means it left on the message, long before
        // the signal would have come (10 s).
        assert_eq!(exit.i64("code"), Some(0), "exited on 'shutdown': {exit}");
        let worker = pid(exit);
        run.cluster.wait_stdout_line(
            |line| line.ends_with(&format!("node {worker} got \"shutdown\"")),
            TIMEOUT,
        );
    }
    let old: Vec<u32> = ready.iter().map(pid).collect();
    assert!(exits.iter().all(|e| old.contains(&pid(e))));
    run.stop();
}

#[test]
fn an_app_that_ignores_the_message_gets_the_signal_after_the_grace() {
    // node -e: no 'message' handler at all, so 'shutdown' does nothing; SIGTERM kills it.
    let mut run = Run::start(&[
        "run",
        "--ipc",
        "node",
        "--stop-grace",
        "300ms",
        "-l",
        "127.0.0.1:0",
        "--",
        "node",
        "-e",
        "require('http').createServer((q, s) => s.end('hi')).listen({ fd: 3 })",
    ]);
    run.wait_ready(1);
    run.cluster.signal(Signal::TERM).expect("SIGTERM");
    let exit = run.cluster.wait_event(|e| e.is("exited"), TIMEOUT);
    assert_eq!(exit.i64("signal"), Some(15), "{exit}");
    let status = run.cluster.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_restart_request_replaces_the_worker_that_sent_it() {
    let mut run = start(&[]);
    run.wait_ready(2);
    let asker = get(&run, "/restart");
    let stopping = run.cluster.wait_event(|e| e.is("stopping"), TIMEOUT);
    assert_eq!(pid(&stopping), asker);
    assert_eq!(stopping.str("reason"), Some("request"), "{stopping}");
    assert_eq!(stopping.u64("grace_ms"), Some(2000), "{stopping}");
    run.wait_ready(3);
    run.stop();
}

#[test]
fn a_line_that_is_not_json_cuts_the_channel_and_replaces_the_worker_not_the_primary() {
    let mut run = start(&[]);
    run.wait_ready(2);
    let culprit = get(&run, "/garbage");
    let error = run.cluster.wait_event(|e| e.is("protocol_error"), TIMEOUT);
    assert!(
        error
            .str("why")
            .is_some_and(|why| why.contains("not a JSON text")),
        "{error}"
    );
    let stopping = run.cluster.wait_event(|e| e.is("stopping"), TIMEOUT);
    assert_eq!(pid(&stopping), culprit);
    run.wait_ready(3);
    // The primary serves on.
    get(&run, "/");
    run.stop();
}
