//! The notify socket trusts no one: datagrams are attributed by the kernel's credentials, and
//! garbage, oversized or foreign datagrams are logged and dropped.

use std::os::unix::net::UnixDatagram;

use ustad_testkit::report::WorkerReport;

use crate::util::{Run, TIMEOUT, test_worker};

#[test]
fn a_datagram_from_a_process_that_is_not_a_worker_marks_nobody_ready() {
    let mut run = Run::start(&[
        "run",
        "--ready",
        "notify",
        "--ready-timeout",
        "60s",
        "--",
        &test_worker(),
        "--never-ready",
        "--report",
        "report.json",
    ]);
    let report = WorkerReport::wait_for(&run.path("report.json"), TIMEOUT);
    let socket = report
        .env("NOTIFY_SOCKET")
        .expect("NOTIFY_SOCKET is set")
        .to_owned();
    // The test process pretends to be the worker.
    UnixDatagram::unbound()
        .unwrap()
        .send_to(b"READY=1", &socket)
        .unwrap();
    let rejected = run.cluster.wait_event(|e| e.is("notify_rejected"), TIMEOUT);
    assert_eq!(rejected.u64("pid"), Some(u64::from(std::process::id())));
    assert!(
        rejected.str("why").unwrap().contains("not a worker"),
        "{rejected}"
    );
    assert!(
        !run.cluster.events().iter().any(|e| e.is("ready")),
        "nobody became ready"
    );
    run.stop();
}

#[test]
fn garbage_and_oversized_datagrams_from_a_worker_are_dropped_and_it_keeps_serving() {
    let oversized = format!("STATUS={}", "x".repeat(5000));
    let mut run = Run::start(&[
        "run",
        "--ready",
        "notify",
        "--",
        &test_worker(),
        "--notify",
        "this is not a notification",
        "--notify",
        &oversized,
        "--notify",
        "READY=maybe",
        "--notify",
        "STATUS=still fine",
    ]);
    run.wait_ready(1);
    let rejected = run
        .cluster
        .wait_events(|e| e.is("notify_rejected"), 3, TIMEOUT);
    let why: Vec<&str> = rejected.iter().map(|e| e.str("why").unwrap()).collect();
    assert!(why[0].contains("not KEY=VALUE"), "{why:?}");
    assert!(why[1].contains("larger than 4096 bytes"), "{why:?}");
    assert!(why[2].contains("READY must be 1"), "{why:?}");
    let status = run.cluster.wait_event(|e| e.is("status"), TIMEOUT);
    assert_eq!(status.str("text"), Some("still fine"));
    assert!(
        !run.cluster.events().iter().any(|e| e.is("exited")),
        "the worker was not harmed"
    );
    run.stop();
}

#[test]
fn a_process_in_a_workers_group_may_speak_for_it() {
    // A wrapper script whose child (not the worker's main process) reports readiness.
    let script = r#"python3 -c 'import os, socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])'; exec sleep 1000"#;
    let mut run = Run::start(&["run", "--ready", "notify", "--", "sh", "-c", script]);
    let ready = run.cluster.wait_event(|e| e.is("ready"), TIMEOUT);
    assert_eq!(ready.u64("id"), Some(1));
    run.stop();
}
