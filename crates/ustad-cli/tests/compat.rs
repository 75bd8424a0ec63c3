//! Unmodified Node.js and Python apps, written for systemd socket activation, run as workers.

use std::collections::BTreeSet;

use ustad_testkit::Signal;
use ustad_testkit::load::{self, LoadOptions};

use crate::util::{Run, TIMEOUT, fixture, pid};

/// Serves through `command` with 2 workers, rolls them once, and serves again.
fn serves_and_rolls(command: &[&str], banner: &str) {
    let mut args = vec![
        "run",
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--ready",
        "delay:300ms",
        "--",
    ];
    args.extend(command);
    let mut run = Run::start(&args);
    let addr = run.addr("listen");
    let workers: BTreeSet<u32> = run.wait_ready(2).iter().map(pid).collect();
    for worker in &workers {
        run.cluster.wait_stdout_line(
            |line| {
                line.ends_with(&format!(
                    "{banner} {worker} {}",
                    if banner == "node" {
                        "listening on fd 3"
                    } else {
                        "serving fd 3"
                    }
                ))
            },
            TIMEOUT,
        );
    }
    let mut options = LoadOptions::new(addr);
    options.keep_alive = false;
    options.max_requests = Some(100);
    let report = load::start(options.clone()).wait();
    assert_eq!(report.failed, 0, "{report}");
    assert!(
        report.by_pid.keys().all(|p| workers.contains(p)),
        "{report}"
    );

    run.cluster.signal(Signal::HUP).unwrap();
    run.cluster
        .wait_event(|e| e.is("rollout_finished"), TIMEOUT);
    run.cluster.wait_events(|e| e.is("exited"), 2, TIMEOUT);
    let report = load::start(options).wait();
    assert_eq!(report.failed, 0, "{report}");
    assert!(
        report.by_pid.keys().all(|p| !workers.contains(p)),
        "new workers serve: {report}"
    );
    run.stop();
}

#[test]
fn an_unmodified_node_app_runs_as_workers() {
    serves_and_rolls(&["node", &fixture("app.js")], "node");
}

#[test]
fn an_unmodified_python_app_runs_as_workers() {
    serves_and_rolls(&["python3", &fixture("app.py")], "python");
}
